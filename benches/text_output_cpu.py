#!/usr/bin/env python3
"""Server-side CPU time of text output per generated token, at several output lengths.

Starts `gym-serve` on a tiny model (with `--reasoning-parser qwen3
--tool-call-parser hermes`, the costliest text path), sends requests with
`max_tokens N` and `ignore_eos`, and reads the server's CPU time from /proc:
the whole process (utime + stime, which keeps exited threads' time) minus the
engine's threads (the `gym-serve-engine` thread and its `gym-serve-compute-N`
pool, read from each thread's schedstat). What is left is the API side: HTTP, detokenization, stop strings, parsers, JSON.

    python3 benches/text_output_cpu.py --bin target/debug/gym-serve [--lengths 500,4000]

Stdlib only. Prints one row per (mode, length): API-side microseconds per token.
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_ns(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) * 1_000_000_000 // TICK


def engine_cpu_ns(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            if not name.startswith(("gym-serve-engin", "gym-serve-compu")):
                continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total


def request(port, path, body, stream):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    tokens = 0
    if stream:
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                tokens += len(c.get("token_ids", []))
    else:
        out = json.loads(resp.read())
        tokens = sum(len(c["token_ids"]) for c in out["choices"])
    conn.close()
    return tokens


def body(mode, n):
    common = {"max_tokens": n, "ignore_eos": True, "seed": 1, "temperature": 1.0,
              "return_token_ids": True, "stream": mode.endswith("stream")}
    if mode.startswith("chat"):
        return "/v1/chat/completions", dict(common, messages=[{"role": "user", "content": "Hi"}])
    return "/v1/completions", dict(common, prompt="Hello there")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/gym-serve")
    ap.add_argument("--lengths", default="500,4000")
    ap.add_argument("--tokens", type=int, default=8000, help="generated tokens per row")
    ap.add_argument("--modes", default="chat-stream,chat,completions-stream")
    args = ap.parse_args()
    model = tempfile.mkdtemp(prefix="text-output-bench-")
    subprocess.run([args.bin, "make-model", "--out", model], check=True, capture_output=True)
    server = subprocess.Popen(
        [args.bin, "--model", model, "--port", "0", "--reasoning-parser", "qwen3",
         "--tool-call-parser", "hermes", "--max-model-len", "8192"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        port = int(line.strip().rsplit(":", 1)[1].split()[0].strip("/"))
        request(port, *body("chat", 16), False)  # warm up
        print(f"{'mode':<20} {'tokens/req':>10} {'reqs':>5} {'api us/token':>13} {'engine us/token':>16}")
        for mode in args.modes.split(","):
            for n in map(int, args.lengths.split(",")):
                reqs = max(1, args.tokens // n)
                path, b = body(mode, n)
                p0, e0 = process_cpu_ns(server.pid), engine_cpu_ns(server.pid)
                tokens = sum(request(port, path, b, b["stream"]) for _ in range(reqs))
                time.sleep(0.2)
                p1, e1 = process_cpu_ns(server.pid), engine_cpu_ns(server.pid)
                api = (p1 - p0) - (e1 - e0)
                print(f"{mode:<20} {n:>10} {reqs:>5} {api / tokens / 1000:>13.1f} "
                      f"{(e1 - e0) / tokens / 1000:>16.1f}", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
