#!/usr/bin/env python3
"""LoRA fidelity against PEFT, in fp32, on a model transformers made.

transformers builds a small seeded Qwen3 from a config and saves it (with the
tokenizer of a `gym-serve make-model` fixture). PEFT wraps it with LoRA
adapters on all seven projections (q/k/v/o/gate/up/down), rank 8 and 64,
rsLoRA off and on, lora_B non-zero, and saves each adapter. One gym-serve
serves the base model and the four adapters (`--lora-modules`); for every
adapter, sampled completions' generation log-probs must equal PeftModel's
log_softmax for those tokens within 1e-4 (max), with token_mult_prob_error
(mean of exp(|diff|)) <= 1.0001. Then PEFT merges each adapter into the base
weights and a gym-serve serving the merged checkpoint must give the same
log-probs for the same tokens (via /v1/logprobs), within the same bounds.

Usage: check_peft.py GYM_SERVE_BINARY WORK_DIR
"""
import json
import math
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Qwen3Config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"r8": (8, False), "r8rs": (8, True), "r64": (64, False), "r64rs": (64, True)}
PROMPTS = [[1, 17, 300, 42, 7, 99, 512], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
MAX_TOKENS = 24
TOL, MULT_TOL = 1e-4, 1.0001


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, binary, model, *extra):
        self.proc = subprocess.Popen([binary, "--model", str(model), "--port", "0", "--kv-cache-tokens", "4096",
                                      "--max-lora-rank", "64", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in self.proc.stdout:
            if "listening on " in line:
                self.url = line.split("listening on ")[1].strip()
                return
        raise SystemExit(f"gym-serve on {model} did not start")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def peft_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def compare(label, ours, theirs):
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    assert len(ours) == len(theirs) and diffs, f"{label}: nothing compared"
    worst = max(diffs)
    mult = sum(math.exp(d) for d in diffs) / len(diffs)
    assert worst <= TOL, f"{label}: max |log-prob diff| {worst:.3e} > {TOL}"
    assert mult <= MULT_TOL, f"{label}: token_mult_prob_error {mult:.6f} > {MULT_TOL}"
    return worst, mult


def make_base(binary, work):
    fixture = work / "fixture"
    subprocess.run([binary, "make-model", "--out", str(fixture), "--arch", "qwen3", "--seed", "3"], check=True,
                   capture_output=True)
    cfg = json.loads((fixture / "config.json").read_text())
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=cfg.get("bos_token_id"),
                         eos_token_id=cfg.get("eos_token_id"))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base = work / "base"
    model.save_pretrained(base)
    for f in fixture.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "generation_config.json"):
            shutil.copy(f, base / f.name)
    return base


def make_adapters(base, work):
    dirs = {}
    for name, (r, rslora) in ADAPTERS.items():
        torch.manual_seed(hash(name) % 1000)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=r, lora_alpha=2 * r if not rslora else 16, target_modules=TARGETS, use_rslora=rslora,
                            lora_dropout=0.0, bias="none", init_lora_weights=False)
        peft = get_peft_model(model, config)
        with torch.no_grad():  # a visible update, not a random walk of logits
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.3)
        peft.save_pretrained(work / name)
        dirs[name] = work / name
    return dirs


def main():
    binary, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    base = make_base(binary, work)
    dirs = make_adapters(base, work)
    modules = ["--lora-modules", *[f"{n}={d}" for n, d in dirs.items()]]
    tokens = {}
    with Server(binary, base, *modules) as srv:
        models = {m["id"] for m in json.loads(urllib.request.urlopen(srv.url + "/v1/models").read())["data"]}
        assert set(ADAPTERS) <= models, f"/v1/models lists {models}"
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        for name in [None, *ADAPTERS]:
            ref = base_model if name is None else PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), dirs[name]).eval()
            ours, theirs = [], []
            for i, prompt in enumerate(PROMPTS):
                body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 11 + i,
                        "logprobs_mode": "raw", "ignore_eos": True}
                if name:
                    body["model"] = name
                c = post(srv.url + "/v1/completions", body)["choices"][0]
                gen, lps = c["generation_token_ids"], c["generation_log_probs"]
                tokens[(name, i)] = (prompt, gen, lps)
                logp = peft_logprobs(ref, prompt + gen)
                ours += lps
                theirs += [float(logp[len(prompt) - 1 + j][t]) for j, t in enumerate(gen)]
            worst, mult = compare(f"adapter {name}", ours, theirs)
            print(f"ok {name or 'base'}: {len(ours)} tokens vs {'PeftModel' if name else 'transformers'}, "
                  f"max diff {worst:.2e}, token_mult_prob_error {mult:.7f}")
        # Adapters change the output (else the check above proves little).
        assert tokens[("r8", 0)][2] != tokens[(None, 0)][2], "adapter r8 gives the base model's log-probs"
        # The file PEFT saved, pushed over HTTP under a new name (the push
        # path reads it as it arrives, not as the loader does), serves the
        # loaded adapter's results bit for bit.
        for name in ADAPTERS:
            config = (dirs[name] / "adapter_config.json").read_text()
            req = urllib.request.Request(
                f"{srv.url}/v1/weights?adapter=pushed-{name}", method="POST",
                data=(dirs[name] / "adapter_model.safetensors").read_bytes(),
                headers={"x-adapter-config": config.replace("\n", " ")})
            json.loads(urllib.request.urlopen(req).read())
            for i, prompt in enumerate(PROMPTS[:2]):
                body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 11 + i,
                        "logprobs_mode": "raw", "ignore_eos": True, "model": f"pushed-{name}"}
                c = post(srv.url + "/v1/completions", body)["choices"][0]
                pushed = (prompt, c["generation_token_ids"], c["generation_log_probs"])
                assert pushed == tokens[(name, i)], f"pushed {name} differs from the loaded adapter"
            print(f"ok pushed {name}: PEFT's file pushed over HTTP = the loaded adapter, bit for bit")
    for name in ADAPTERS:
        merged_dir = work / f"merged-{name}"
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), dirs[name])
        peft.merge_and_unload().save_pretrained(merged_dir)
        for f in base.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "generation_config.json"):
                shutil.copy(f, merged_dir / f.name)
        with Server(binary, merged_dir) as srv:
            ours, theirs = [], []
            for i in range(len(PROMPTS)):
                prompt, gen, lps = tokens[(name, i)]
                r = post(srv.url + "/v1/logprobs", {"token_ids": prompt + gen, "start": len(prompt),
                                                   "logprobs_mode": "raw"})
                ours += lps
                theirs += r["token_logprobs"]
            worst, mult = compare(f"merged {name}", ours, theirs)
            print(f"ok merged {name}: adapter serving vs merged checkpoint, max diff {worst:.2e}, "
                  f"token_mult_prob_error {mult:.7f}")
    print("PEFT check passed")


if __name__ == "__main__":
    main()
