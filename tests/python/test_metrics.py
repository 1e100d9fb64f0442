"""/metrics parses with the Prometheus text parser, and its counters move with traffic."""
import json
import os
import subprocess
import tempfile
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

BIN = os.environ.get("GYM_SERVE_BIN", "target/debug/gym-serve")


def scrape(base):
    with urllib.request.urlopen(f"{base}/metrics") as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_parse_and_move():
    work = tempfile.mkdtemp()
    model = os.path.join(work, "tiny")
    subprocess.run([BIN, "make-model", "--out", model], check=True, capture_output=True)
    proc = subprocess.Popen([BIN, "--model", model, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        base = proc.stdout.readline().strip().removeprefix("gym-serve listening on ")
        before = scrape(base)
        body = json.dumps({"prompt": "hello there", "max_tokens": 7, "ignore_eos": True}).encode()
        for _ in range(3):
            req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req).read()
        after = scrape(base)
        key = ("gym_serve_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
        assert after[key] - before.get(key, 0) == 3
        gen = ("gym_serve_generation_tokens_total", ())
        assert after[gen] - before[gen] == 21
        ttft = ("gym_serve_time_to_first_token_seconds_count", ())
        assert after[ttft] - before.get(ttft, 0) == 3
        assert after[("gym_serve_weight_version", (("version", "0"),))] == 1
        assert after[("gym_serve_num_requests_running", ())] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
