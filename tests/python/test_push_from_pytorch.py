"""examples/push_from_pytorch.py against running servers: a PyTorch state
dict (bf16) lands in both of two, and both then serve the same new weights;
across three, a body corrupted on its way to one of them lands on none (and
the error names that server), and the same push without the fault on all."""
import json
import os
import subprocess
import sys
import tempfile
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from push_from_pytorch import FleetPushError, push_state_dict  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from fleet import CorruptingProxy, Fleet, http  # noqa: E402

BIN = os.environ.get("GYM_SERVE_BIN", "target/debug/gym-serve")


def start(model):
    proc = subprocess.Popen([BIN, "--model", model, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    assert line.startswith("gym-serve listening on "), line
    return proc, line.removeprefix("gym-serve listening on ")


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def test_push_state_dict_to_two_servers():
    work = tempfile.mkdtemp()
    model_dir = os.path.join(work, "tiny")
    subprocess.run([BIN, "make-model", "--out", model_dir, "--seed", "4"], check=True, capture_output=True)
    servers = [start(model_dir) for _ in range(2)]
    try:
        urls = [u for _, u in servers]
        request = {"prompt": [1, 5, 9, 13], "max_tokens": 6, "seed": 3}
        before = post(f"{urls[0]}/v1/completions", request)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        answers = push_state_dict(model.state_dict(), urls, version="step-1")
        assert [a["weight_version"] for a in answers] == ["step-1", "step-1"]
        after = [post(f"{u}/v1/completions", request) for u in urls]
        assert after[0]["weight_version"] == "step-1"
        assert after[0]["choices"][0]["generation_log_probs"] == after[1]["choices"][0]["generation_log_probs"]
        assert after[0]["choices"][0]["generation_log_probs"] != before["choices"][0]["generation_log_probs"]
        # The served weights are the bf16-rounded state dict: check one log-prob against PyTorch.
        ids = after[0]["choices"][0]["prompt_token_ids"] + after[0]["choices"][0]["generation_token_ids"]
        rounded = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in model.state_dict().items()}
        model.load_state_dict(rounded)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        first = after[0]["choices"][0]["generation_token_ids"][0]
        expected = float(logp[len(after[0]["choices"][0]["prompt_token_ids"]) - 1, first])
        assert abs(expected - after[0]["choices"][0]["generation_log_probs"][0]) < 1e-4
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)


def test_push_state_dict_to_three_servers_is_all_or_nothing():
    model_dir = os.path.join(tempfile.mkdtemp(), "tiny")
    subprocess.run([BIN, "make-model", "--out", model_dir, "--seed", "5"], check=True, capture_output=True)
    fleet = Fleet(model_dir, 3)
    try:
        greedy = {"prompt": [1, 5, 9, 13], "max_tokens": 6, "temperature": 0.0}
        before = [http("POST", f"{u}/v1/completions", greedy)["choices"][0]["generation_log_probs"]
                  for u in fleet.urls]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        proxy = CorruptingProxy(fleet.urls[2])
        try:
            with pytest.raises(FleetPushError) as failed:
                push_state_dict(model.state_dict(), fleet.urls[:2] + [proxy.url], version="step-1")
        finally:
            proxy.stop()
        assert proxy.corrupted == 1
        assert list(failed.value.errors) == [proxy.url], failed.value
        assert "checksum mismatch" in failed.value.errors[proxy.url]
        assert failed.value.serving == {u: "v0" for u in fleet.urls[:2] + [proxy.url]}
        assert fleet.versions() == ["v0"] * 3
        assert [http("POST", f"{u}/v1/completions", greedy)["choices"][0]["generation_log_probs"]
                for u in fleet.urls] == before
        answers = push_state_dict(model.state_dict(), fleet.urls, version="step-1")
        assert [a["weight_version"] for a in answers] == ["step-1"] * 3
        after = [http("POST", f"{u}/v1/completions", greedy)["choices"][0]["generation_log_probs"]
                 for u in fleet.urls]
        assert after[0] == after[1] == after[2] != before[0]
    finally:
        fleet.stop()
