#!/usr/bin/env python3
"""The server test suite's essential checks and the engine and refit
benchmarks against one gym-serve binary, in one call, with one table at the
end. Run through scripts/gpu-check.sh (which finds the CUDA libraries);
standard library only, no network.

    gpu_check.py BIN MODEL_DIR [--device gpu|cpu] [--budget SECONDS]

MODEL_DIR is made with `BIN make-model` (bf16, the qwen3-0.6b-shape preset
on a GPU, tiny on the CPU) when it does not exist. `--device cpu` runs the
same checks against the CPU engine (f32), with the contract's 1e-4
tolerance instead of bf16's, and smaller benchmarks.
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROWS = []  # (check, result, detail)


def row(check, result, detail):
    ROWS.append((check, result, detail))
    print(f"[{result}] {check}: {detail}", flush=True)


class Server:
    def __init__(self, bin_path, model_dir, device, log_path, extra=()):
        cmd = [bin_path, "--model", model_dir, "--host", "127.0.0.1", "--port", "0",
               "--served-model-name", "check", "--seed", "0", *extra]
        if device == "gpu":
            cmd.append("--gpu")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = None
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                if line.startswith("gym-serve listening on "):
                    self.url = line.split(" on ", 1)[1].strip()
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(600)
        if not self.url:
            self.stop()
            tail = open(log_path).read()[-3000:]
            raise SystemExit(f"the server did not start:\n{tail}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def request(self, method, path, body=None, raw=None, timeout=600):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if raw is None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def ok(self, path, body):
        status, reply = self.request("POST", path, body)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {str(reply)[:300]}")
        return reply


def greedy(srv, prompt, max_tokens=32):
    r = srv.ok("/v1/completions", {"model": "check", "prompt": prompt, "max_tokens": max_tokens,
                                   "temperature": 0.0, "ignore_eos": True, "logprobs": 0,
                                   "return_token_ids": True})
    c = r["choices"][0]
    return c["prompt_token_ids"], c["generation_token_ids"], c["generation_log_probs"], r


def check_transport(srv):
    for endpoint, body in [
        ("/v1/completions", {"prompt": ["The sky is", "One, two,"], "n": 3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a color."}], "n": 4}),
    ]:
        body.update({"model": "check", "max_tokens": 12, "temperature": 1.0, "seed": 7,
                     "logprobs": True if "messages" in body else 0, "return_token_ids": True})
        r = srv.ok(endpoint, body)
        choices = r["choices"]
        want = 6 if "prompt" in body else 4
        assert len(choices) == want, f"{endpoint}: {len(choices)} choices, expected {want}"
        for c in choices:
            m = c.get("message", c)
            p, g, lp = m["prompt_token_ids"], m["generation_token_ids"], m["generation_log_probs"]
            assert p and g, f"{endpoint}: choice {c['index']} lacks token IDs"
            assert len(lp) == len(g), f"{endpoint}: {len(lp)} log-probs for {len(g)} tokens"
            assert all(isinstance(x, float) and math.isfinite(x) and x <= 0 for x in lp), \
                f"{endpoint}: a log-prob is not a finite natural log"
            assert c.get("token_ids") == g, f"{endpoint}: token_ids differs from generation_token_ids"
    return "prompt/generation IDs and finite log-probs on all 10 choices (completions n=3 x 2, chat n=4)"


def check_splice(srv):
    msgs = [{"role": "user", "content": "Say a word."}]
    previous = None
    for turn in range(3):
        r = srv.ok("/v1/chat/completions", {"model": "check", "messages": msgs, "max_tokens": 8,
                                            "temperature": 1.0, "seed": turn})
        m = r["choices"][0]["message"]
        if previous is not None:
            assert m["prompt_token_ids"][:len(previous)] == previous, \
                f"turn {turn + 1}'s prompt does not start with turn {turn}'s tokens"
        previous = m["prompt_token_ids"] + m["generation_token_ids"]
        msgs = msgs + [{"role": "assistant", "content": m["content"] or "",
                        "prompt_token_ids": m["prompt_token_ids"],
                        "generation_token_ids": m["generation_token_ids"],
                        "generation_log_probs": m["generation_log_probs"]},
                       {"role": "user", "content": "Another."}]
    return "turns 2 and 3 begin with the exact prompt + generation tokens of the turn before"


def check_scoring(srv, device):
    worst, total, n = 0.0, 0.0, 0
    for i, temperature in enumerate([0.0, 1.0, 1.0]):
        r = srv.ok("/v1/completions", {"model": "check", "prompt": f"Fact {i}: the", "max_tokens": 48,
                                       "temperature": temperature, "seed": i, "ignore_eos": True,
                                       "logprobs": 0, "logprobs_mode": "raw"})
        c = r["choices"][0]
        ids = c["prompt_token_ids"] + c["generation_token_ids"]
        s = srv.ok("/v1/logprobs", {"model": "check", "token_ids": ids, "start": len(c["prompt_token_ids"]),
                                    "logprobs_mode": "raw"})
        for a, b in zip(c["generation_log_probs"], s["token_logprobs"]):
            worst, total, n = max(worst, abs(a - b)), total + abs(a - b), n + 1
    mean = total / max(n, 1)
    # The contract's bound is for f32 on the CPU; bf16 on a GPU differs by
    # batch shape (a step's batch vs. one teacher-forced pass).
    limit_max, limit_mean = (1e-4, 1e-4) if device == "cpu" else (0.25, 0.02)
    detail = f"|gen - /v1/logprobs| max {worst:.2e}, mean {mean:.2e} over {n} tokens (limit {limit_max:g}/{limit_mean:g})"
    return worst <= limit_max and mean <= limit_mean, detail


def other_transfer(device):
    """The sampling transfer the main server does not use (its default is
    `summary` on a GPU, `rows` on the CPU)."""
    return "rows" if device == "gpu" else "summary"


def compare_transfer(srv, other):
    """The same seeded requests against a server whose sampled logits reach
    the sampler the other way. Returns (identical tokens, sampled choices that
    diverged, greedy choices that diverged, worst log-prob difference before
    any divergence). A sampled draw may rarely take the neighbouring token:
    the device sums its row's masses with other rounding than the host walk,
    and on a near-flat row (a random model) tokens sit ~1e-5 of mass apart."""
    worst, tokens, diverged, greedy_diverged = 0.0, 0, [], []
    for body in [{"prompt": ["The sky is", "One, two,"], "n": 3, "temperature": 1.0, "logprobs": 3},
                 {"prompt": "Count: 1, 2,", "temperature": 0.7, "min_p": 0.05, "logprobs": 0},
                 {"prompt": "Colors:", "temperature": 0.0, "logprobs": 2}]:
        body.update({"model": "check", "max_tokens": 24, "seed": 11, "ignore_eos": True,
                     "return_token_ids": True})
        a, b = srv.ok("/v1/completions", body), other.ok("/v1/completions", body)
        for x, y in zip(a["choices"], b["choices"]):
            gx, gy = x["generation_token_ids"], y["generation_token_ids"]
            at = next((i for i, (p, q) in enumerate(zip(gx, gy)) if p != q), min(len(gx), len(gy)))
            if gx != gy:
                where = f"{body['prompt']!r} choice {x['index']} from position {at}"
                (greedy_diverged if body["temperature"] == 0.0 else diverged).append(where)
            for p, q in list(zip(x["generation_log_probs"], y["generation_log_probs"]))[:at]:
                worst = max(worst, abs(p - q))
            tokens += at
    return tokens, diverged, greedy_diverged, worst


def check_transfer(srv, other, allowed=1):
    """compare_transfer, passing with at most `allowed` diverged sampled
    choices (of 8), none greedy, log-probs within 1e-3."""
    tokens, diverged, greedy_diverged, worst = compare_transfer(srv, other)
    assert not greedy_diverged, f"greedy tokens differ: {greedy_diverged}"
    assert len(diverged) <= allowed, f"sampled tokens differ: {diverged}"
    assert worst <= 1e-3, f"log-probs differ by up to {worst:.2e}"
    note = f" ({len(diverged)} sampled choice took a neighbour: {diverged[0]})" if diverged else ""
    return f"{tokens} tokens identical, log-probs within {worst:.1e}{note}"


def check_whole_blocks(bin_path, device, work, pool):
    """The summary sampler on a vocabulary that is a whole number of its
    blocks (32,768 = 128 x 256, as Mistral's): no padding column at all."""
    model = os.path.join(work, "vocab-32768")
    subprocess.run([bin_path, "make-model", "--preset", "tiny", "--vocab", "32768", "--dtype", "bf16",
                    "--out", model], check=True, capture_output=True)
    srv = Server(bin_path, model, device, os.path.join(work, "server-vocab.log"),
                 ["--sampling-transfer", "summary", *pool])
    try:
        tokens = 0
        for body in [{"prompt": "a b c", "n": 2, "temperature": 1.0, "logprobs": 2},
                     {"prompt": "a b c", "temperature": 0.0, "logprobs": 1}]:
            body.update({"model": "check", "max_tokens": 8, "seed": 3, "ignore_eos": True,
                         "return_token_ids": True})
            for c in srv.ok("/v1/completions", body)["choices"]:
                g, lp = c["generation_token_ids"], c["generation_log_probs"]
                assert len(g) == 8 and all(0 <= t < 32768 for t in g), f"tokens {g}"
                assert all(math.isfinite(x) and x <= 0 for x in lp), f"log-probs {lp}"
                tokens += len(g)
        return f"vocabulary 32,768 (no padding block): {tokens} tokens sampled, finite log-probs"
    finally:
        srv.stop()


# --- safetensors, read and written with the standard library -------------

def read_safetensors(model_dir):
    """Every tensor of the checkpoint: name -> (dtype, shape, bytes)."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    tensors = {}
    for f in files:
        with open(os.path.join(model_dir, f), "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            data = fh.read()
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            tensors[name] = (meta["dtype"], meta["shape"], data[a:b])
    return tensors


def write_safetensors(path, tensors):
    header, offset, parts = {}, 0, []
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        parts.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for p in parts:
            f.write(p)


def perturbed_norm(tensors):
    """The final norm's weights as 0.5 (bf16) or 0.5 (f32): a change the
    output shows, as a one-tensor partial push."""
    name = "model.norm.weight"
    dtype, shape, data = tensors[name]
    count = math.prod(shape)
    value = struct.pack("<H", 0x3F00) if dtype == "BF16" else struct.pack("<f", 0.5)
    if dtype not in ("BF16", "F32"):
        raise RuntimeError(f"{name} is {dtype}; the check writes bf16 or f32")
    return {name: (dtype, shape, value * count)}


def push(srv, path, version, mode="full", pause="wait"):
    with open(path, "rb") as f:
        raw = f.read()
    started = time.monotonic()
    status, reply = srv.request("POST", f"/v1/weights?version={version}&mode={mode}&pause={pause}", raw=raw)
    seconds = time.monotonic() - started
    if status != 200:
        raise RuntimeError(f"push ({mode}, pause={pause}) answered {status}: {str(reply)[:300]}")
    return seconds, reply


def in_flight(srv, results):
    """A long generation running while a push arrives."""
    def go():
        try:
            r = srv.ok("/v1/completions", {"model": "check", "prompt": "Count:", "max_tokens": 256,
                                           "temperature": 1.0, "seed": 3, "ignore_eos": True})
            results.append(r["choices"][0]["finish_reason"])
        except Exception as e:  # the check reports it
            results.append(f"error: {e}")
    t = threading.Thread(target=go)
    t.start()
    time.sleep(0.5)
    return t


def check_pushes(srv, model_dir, work):
    tensors = read_safetensors(model_dir)
    dtypes = sorted({t[0] for t in tensors.values()})
    full = os.path.join(work, "full.safetensors")
    write_safetensors(full, tensors)
    part = os.path.join(work, "norm.safetensors")
    write_safetensors(part, perturbed_norm(tensors))
    # For `validate`, whose push must change the output.
    write_safetensors(os.path.join(work, "perturbed.safetensors"), {**tensors, **perturbed_norm(tensors)})
    base = greedy(srv, "The capital of France is", 32)
    # pause=wait with a request in flight: a partial push that changes the output.
    got = []
    t = in_flight(srv, got)
    push(srv, part, "perturbed", mode="partial", pause="wait")
    t.join()
    changed = greedy(srv, "The capital of France is", 32)
    ok_change = changed[1] != base[1] or changed[2] != base[2]
    row("weight push, mode=partial pause=wait", "PASS" if ok_change and got[0] in ("length", "stop") else "FAIL",
        f"in-flight request finished ({got[0]}); output changed: {ok_change}; version {changed[3]['weight_version']}")
    # pause=abort: the in-flight request ends with finish_reason abort.
    got = []
    t = in_flight(srv, got)
    push(srv, full, "abort", pause="abort")
    t.join()
    row("weight push, mode=full pause=abort", "PASS" if got[0] in ("abort", "length") else "FAIL",
        f"in-flight request ended with {got[0]}")
    # pause=keep: the request continues after the swap.
    got = []
    t = in_flight(srv, got)
    push(srv, full, "keep", pause="keep")
    t.join()
    row("weight push, mode=full pause=keep", "PASS" if got[0] in ("length", "stop") else "FAIL",
        f"in-flight request finished ({got[0]}) across the swap")
    # The original weights pushed back serve exactly as the fresh load did.
    again = greedy(srv, "The capital of France is", 32)
    same = again[1] == base[1] and again[2] == base[2]
    row(f"{'/'.join(dtypes).lower()} push bit-identical to a fresh load", "PASS" if same else "FAIL",
        "greedy tokens and log-probs equal" if same else
        f"differ: first token diff at {next((i for i, (a, b) in enumerate(zip(again[1], base[1])) if a != b), '-')}, "
        f"max |dlogprob| {max(abs(a - b) for a, b in zip(again[2], base[2])):.2e}")
    return full, os.path.getsize(full)


def refit_bench(srv, full, size):
    times, serving, server_s = [], [], []
    for i in range(3):
        started = time.monotonic()
        seconds, reply = push(srv, full, f"refit-{i}")
        _, _, _, r = greedy(srv, "Hi", 1)
        serving.append(time.monotonic() - started)
        times.append(seconds)
        server_s.append(reply.get("seconds", float("nan")) if isinstance(reply, dict) else float("nan"))
        assert r["weight_version"] == f"refit-{i}", r["weight_version"]
    row("refit: full push, time to serving", "INFO",
        f"{size / 1e6:.0f} MB: push {min(times):.3f}s best / {sum(times) / 3:.3f}s mean, "
        f"server-side {min(server_s):.3f}s, to first served token {min(serving):.3f}s")


def engine_bench(bin_path, srv, work, levels, prompt_len, max_tokens, deadline, label=""):
    for c in levels:
        name = f"engine: {c} sequences{label}"
        if time.monotonic() > deadline:
            row(name, "SKIP", "out of time budget")
            continue
        out = os.path.join(work, f"bench-{c}{label.strip().replace(' ', '-')}.json")
        cmd = [bin_path, "bench", "--url", srv.url, "--model", "check", "--completions",
               "--concurrency", str(c), "--requests", str(max(2 * c, 4)), "--prompt-len", str(prompt_len),
               "--max-tokens", str(max_tokens), "--json", out]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, deadline - time.monotonic()))
        if p.returncode != 0 or not os.path.exists(out):
            row(name, "FAIL", (p.stderr or p.stdout)[-300:])
            continue
        s = json.load(open(out))
        bad = s.get("errors") or {}
        row(name, "INFO" if not bad else "FAIL",
            f"{s['output_tok_s']:.1f} output tok/s, {s['completed']}/{s['requests']} requests, "
            f"prompt {prompt_len} + {max_tokens} tokens" + (f", errors {bad}" if bad else ""))


def run_validate(bin_path, srv, weights):
    p = subprocess.run([bin_path, "validate", "--url", srv.url, "--model", "check", "--weights", weights],
                       capture_output=True, text=True, timeout=300)
    for line in p.stdout.splitlines():
        if line.startswith("[") and "] " in line:
            mark, rest = line[1:].split("] ", 1)
            name, _, detail = rest.partition(": ")
            row(f"validate: {name}", mark, detail)
    if p.returncode != 0 and not any(r[0].startswith("validate") for r in ROWS):
        row("validate", "FAIL", (p.stderr or p.stdout)[-300:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bin")
    ap.add_argument("model_dir")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run (benchmarks are cut)")
    ap.add_argument("--no-bench", action="store_true")
    a = ap.parse_args()
    started = time.monotonic()
    deadline = started + a.budget
    for line in os.environ.get("GPU_CHECK_LIBS", "").splitlines():
        name, _, detail = line.partition("\t")
        found = detail.startswith("found") or a.device == "cpu"
        row(f"library {name}", "INFO" if found else "MISS", detail)
    work = tempfile.mkdtemp(prefix="gym-serve-gpu-check-")
    if not os.path.isdir(a.model_dir):
        preset = "qwen3-0.6b-shape" if a.device == "gpu" else "tiny"
        subprocess.run([a.bin, "make-model", "--preset", preset, "--dtype", "bf16", "--out", a.model_dir],
                       check=True, capture_output=True)
        row("model", "INFO", f"made {preset} (bf16) in {a.model_dir}")
    t0 = time.monotonic()
    srv = Server(a.bin, a.model_dir, a.device, os.path.join(work, "server.log"))
    row("server start", "INFO", f"{srv.url} on {a.device} in {time.monotonic() - t0:.1f}s (log {work}/server.log)")
    try:
        for name, fn in [("token transport", lambda: check_transport(srv)),
                         ("splice", lambda: check_splice(srv))]:
            try:
                row(name, "PASS", fn())
            except Exception as e:
                row(name, "FAIL", str(e)[:300])
        try:
            ok, detail = check_scoring(srv, a.device)
            row("scoring equals generation", "PASS" if ok else "FAIL", detail)
        except Exception as e:
            row("scoring equals generation", "FAIL", str(e)[:300])
        full = None
        try:
            full, size = check_pushes(srv, a.model_dir, work)
        except Exception as e:
            row("weight pushes", "FAIL", str(e)[:300])
        if full:
            run_validate(a.bin, srv, os.path.join(work, "perturbed.safetensors"))
            try:
                refit_bench(srv, full, size)
            except Exception as e:
                row("refit", "FAIL", str(e)[:300])
        if not a.no_bench:
            if a.device == "gpu":
                engine_bench(a.bin, srv, work, [1, 8, 32, 64, 256], 128, 128, deadline)
            else:
                engine_bench(a.bin, srv, work, [1, 4], 16, 8, deadline)
    finally:
        srv.stop()
    other = other_transfer(a.device)
    # Two servers at once: on a GPU each gets a fixed pool (15 GB for the
    # 0.6B shape), not --gpu-memory-utilization's share of the whole GPU.
    pool = ["--kv-cache-tokens", "131072"] if a.device == "gpu" else []
    name = f"sampling transfer: {other} vs default"
    srv = first = None
    try:
        srv = Server(a.bin, a.model_dir, a.device, os.path.join(work, "server-transfer.log"),
                     ["--sampling-transfer", other, *pool])
        first = Server(a.bin, a.model_dir, a.device, os.path.join(work, "server-again.log"), pool)
        row(name, "PASS", check_transfer(first, srv))
    except (Exception, SystemExit) as e:
        row(name, "FAIL", str(e)[:300])
    finally:
        if first:
            first.stop()
    try:
        row("summary sampler, whole blocks", "PASS", check_whole_blocks(a.bin, a.device, work, pool))
    except (Exception, SystemExit) as e:
        row("summary sampler, whole blocks", "FAIL", str(e)[:300])
    if srv:
        try:
            if not a.no_bench and a.device == "gpu":
                engine_bench(a.bin, srv, work, [32, 256], 128, 128, deadline, f", {other}")
        finally:
            srv.stop()
    width = max(len(r[0]) for r in ROWS)
    print(f"\n{'check'.ljust(width)}  result  detail")
    print(f"{'-' * width}  ------  ------")
    for check, result, detail in ROWS:
        print(f"{check.ljust(width)}  {result.ljust(6)}  {detail}")
    failed = [r for r in ROWS if r[1] == "FAIL"]
    print(f"\n{len(failed)} failed; {time.monotonic() - started:.0f}s in all")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
