#!/usr/bin/env python3
"""gym-serve against transformers, in fp32, on checkpoints gym-serve did not make.

For each checkpoint directory (see make_checkpoints.py) it starts the real
server (`gym-serve --model DIR --port 0`), talks HTTP to it, and checks:

  * chat prompts (a few conversations, one with a system message, one
    multi-turn) tokenize to the same IDs through POST /tokenize as
    transformers' `apply_chat_template`; plain strings tokenize as the
    GGUF's own tokenizer does (every checkpoint here uses SmolLM2's);
  * greedy generation (5 chat prompts, 32 tokens) gives the same token IDs and
    text as transformers' greedy decoding (its argmax at every step, by teacher
    forcing over our tokens, and the same stop);
  * sampled generation at temperature 1 (several prompts and seeds, >= 500
    tokens): every generation_log_prob is within 1e-3 of transformers'
    log_softmax for that token, and token_mult_prob_error <= 1.001;
  * a prompt of >= 2,000 tokens (RoPE at long positions): the tokens sampled
    after it, and POST /v1/logprobs over every position of it, are within
    1e-3 of transformers.

token_mult_prob_error is NeMo RL's: the mean over tokens of
exp(|logp_generation - logp_train|) (nemo_rl/algorithms/loss_functions.py,
`masked_mean(torch.exp(lp_error * mask), mask)`); 1.0 is perfect.

A checkpoint whose parity_meta.json lists `may_refuse` fields (sliding
window) may instead be refused: a failed load, or a 400, whose message names
one of those fields, counts as REFUSED (allowed); so does a context capped at
the window (max_model_len <= sliding_window, the long prompt a 400 with
`maximum context length`; the long check then runs just under the cap).
Silently serving different numbers is a FAIL.

Usage: check_parity.py GYM_SERVE_BINARY CKPT_DIR... [--json OUT] [--tolerance 1e-3]
Prints one line per checkpoint; exits 1 if any failed.
"""
import argparse
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoints import KNOWN_ENCODINGS, long_token_ids  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant. Answer in one word."},
     {"role": "user", "content": "Name a primary colour."}],
    [{"role": "system", "content": "You are a helpful math tutor."},
     {"role": "user", "content": "What is 17 * 23?"},
     {"role": "assistant", "content": "17 * 23 = 391."},
     {"role": "user", "content": "And 391 / 17? Explain step by step, with 2 examples."}],
]
GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 100.",
    "Explain what a neural network is in one sentence.",
    "Translate 'good morning' into Spanish.",
]
SAMPLE_PROMPTS = [
    ("Tell me a short story about a robot who learns to paint.", 11),
    ("Give me some tips for learning to play the guitar.", 22),
    ("Why is the sky blue? Explain like I'm five.", 33),
]
SAMPLE_TOKENS = 96   # x 2 choices x 3 prompts = 576 sampled tokens
LONG_PROMPT_TOKENS = 2100
LONG_GEN_TOKENS = 32
GREEDY_TOKENS = 32


class Server:
    def __init__(self, binary, ckpt, log_path, extra=()):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--model", str(ckpt), "--host", "127.0.0.1", "--port", "0", "--served-model-name", "m",
             *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = None
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return
            r, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if r:
                line = self.proc.stdout.readline()
                if line.startswith("gym-serve listening on "):
                    self.url = line.split(" on ", 1)[1].strip()
                    return
                if not line:
                    self.proc.wait(timeout=30)
                    return
        self.stop()

    def stderr(self):
        self.log.flush()
        return Path(self.log_path).read_text()

    def post(self, path, body, timeout=1800):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"error": {"message": text}}

    def get(self, path, timeout=60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Refused(Exception):
    pass


class Failed(Exception):
    pass


def error_message(body):
    err = body.get("error") if isinstance(body, dict) else None
    return err.get("message", "") if isinstance(err, dict) else json.dumps(body)


def as_ids(x):
    if hasattr(x, "input_ids"):
        x = x["input_ids"]
    if isinstance(x, dict):
        x = x["input_ids"]
    return [int(i) for i in x]


class Checker:
    def __init__(self, server, ckpt, tol, may_refuse, meta):
        self.s = server
        self.meta = meta
        self.tol = tol
        self.may_refuse = may_refuse
        self.tok = AutoTokenizer.from_pretrained(ckpt)
        self.model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.gen_diffs = []     # |diff| per sampled/greedy/long-generation token
        self.score_diffs = []   # |diff| per /v1/logprobs position of the long prompt
        self.notes = []
        self.failures = []

    def call(self, path, body, what):
        status, resp = self.s.post(path, body)
        if status == 200:
            return resp
        msg = error_message(resp)
        if status == 400 and any(f in msg for f in self.may_refuse):
            raise Refused(f"{what}: 400 {msg}")
        raise Failed(f"{what}: HTTP {status}: {msg}")

    @torch.no_grad()
    def logprobs(self, ids):
        logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def compare(self, prompt_ids, gen_ids, gen_lps, what, sink):
        if len(gen_ids) != len(gen_lps):
            raise Failed(f"{what}: {len(gen_ids)} generation_token_ids but {len(gen_lps)} generation_log_probs")
        lp = self.logprobs(list(prompt_ids) + list(gen_ids))
        if not gen_ids:
            return lp
        n = len(prompt_ids)
        rows = lp[n - 1: n - 1 + len(gen_ids)]
        theirs = rows.gather(1, torch.tensor(gen_ids)[:, None])[:, 0].double()
        diff = (theirs - torch.tensor(gen_lps, dtype=torch.float64)).abs()
        sink.extend(diff.tolist())
        return lp

    def chat_tokens(self):
        ok = 0
        for i, conv in enumerate(CONVERSATIONS):
            ours = self.call("/tokenize", {"messages": conv, "add_generation_prompt": True}, f"/tokenize conversation {i}")
            theirs = as_ids(self.tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
            if ours["tokens"] != theirs:
                self.failures.append(f"conversation {i}: /tokenize gives {ours['tokens']} but apply_chat_template "
                                     f"gives {theirs}")
            else:
                ok += 1
        # Plain strings: against transformers' AutoTokenizer, and where the
        # directory has SmolLM2's own tokenizer, against the GGUF's encodings
        # (the model's truth). Where transformers itself departs from the
        # tokenizer.json it was given, gym-serve matching the truth is noted.
        truth = self.meta.get("tokenizer") == "smollm2"
        tf_bad = []
        for text, ids in KNOWN_ENCODINGS:
            ours = self.call("/tokenize", {"prompt": text, "add_special_tokens": True}, "/tokenize text")["tokens"]
            theirs = as_ids(self.tok(text, add_special_tokens=True))
            if truth:
                if ours != ids:
                    self.failures.append(f"{text!r} tokenizes to {ours}; the GGUF's tokenizer gives {ids}")
                if theirs != ids:
                    tf_bad.append(text)
            elif ours != theirs:
                self.failures.append(f"{text!r} tokenizes to {ours}; transformers gives {theirs}")
        if tf_bad:
            self.notes.append(f"transformers' AutoTokenizer on this directory departs from its tokenizer.json "
                              f"(the model's tokenizer) on {len(tf_bad)} strings ({', '.join(repr(t) for t in tf_bad)}); "
                              f"gym-serve follows tokenizer.json")
        return ok

    def parallel(self, calls):
        """Send requests at once (the server batches them); results in order."""
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            futures = [pool.submit(self.call, *c) for c in calls]
            return [f.result() for f in futures]

    def greedy(self):
        """Greedy decoding picks transformers' argmax at every step (teacher
        forcing over the tokens we generated, which is what transformers'
        greedy `generate` computes step by step), and stops where it would:
        at the first stop token of generation_config.json, or at max_tokens."""
        same = 0
        calls = [("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": p}],
                                           "max_tokens": GREEDY_TOKENS, "temperature": 0, "logprobs": True,
                                           "top_logprobs": 0, "logprobs_mode": "raw"}, "greedy chat")
                 for p in GREEDY_PROMPTS]
        for p, r in zip(GREEDY_PROMPTS, self.parallel(calls)):
            m = r["choices"][0]["message"]
            prompt, ours, lps = m["prompt_token_ids"], m["generation_token_ids"], m["generation_log_probs"]
            lp = self.compare(prompt, ours, lps, "greedy", self.gen_diffs)
            n = len(prompt)
            theirs = []
            for i in range(len(ours)):
                best = int(lp[n - 1 + i].argmax())
                theirs.append(best)
                if best != ours[i] or best in self.eos:
                    break
            if len(theirs) == len(ours) and len(ours) < GREEDY_TOKENS and theirs[-1:] and theirs[-1] not in self.eos:
                theirs.append(-1)  # transformers would have gone on
            if theirs == ours:
                same += 1
                continue
            k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            row = lp[n - 1 + min(k, len(ours) - 1)]
            detail = ""
            if k < min(len(ours), len(theirs)) and theirs[k] >= 0:
                detail = (f" (transformers' log-probs there: its argmax {theirs[k]} {float(row[theirs[k]]):.5f}, "
                          f"our {ours[k]} {float(row[ours[k]]):.5f})")
            self.failures.append(f"greedy {p!r}: differs from transformers' argmax at token {k}{detail}: ours "
                                 f"{self.tok.decode(ours, skip_special_tokens=True)!r}, transformers' prefix "
                                 f"{self.tok.decode([t for t in theirs if t >= 0], skip_special_tokens=True)!r}")
        return same

    def sampled(self):
        count = 0
        calls = [("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": p}],
                                           "max_tokens": SAMPLE_TOKENS, "temperature": 1.0, "top_p": 1.0,
                                           "seed": seed, "n": 2, "ignore_eos": True, "logprobs": True,
                                           "top_logprobs": 0, "logprobs_mode": "raw"}, "sampled chat")
                 for p, seed in SAMPLE_PROMPTS]
        for r in self.parallel(calls):
            for c in r["choices"]:
                m = c["message"]
                self.compare(m["prompt_token_ids"], m["generation_token_ids"], m["generation_log_probs"],
                             "sampled", self.gen_diffs)
                count += len(m["generation_token_ids"])
        return count

    def long(self):
        n = LONG_PROMPT_TOKENS
        limit = (self.s.get("/v1/models").get("data") or [{}])[0].get("max_model_len")
        window = getattr(self.model.config, "sliding_window", None)
        if limit is not None and n + LONG_GEN_TOKENS > limit:
            # A server may cap the context at a sliding window instead of
            # implementing it: then the long prompt must be a 400 saying so
            # (`maximum context length`), and the check runs up to the cap.
            if not (self.may_refuse and window and limit <= window):
                raise Failed(f"max_model_len is {limit}, below the {n + LONG_GEN_TOKENS} tokens of the long-prompt check")
            ids = long_token_ids(self.tok, n)
            status, body = self.s.post("/v1/completions", {"model": "m", "prompt": ids, "max_tokens": 1})
            msg = error_message(body)
            if status != 400 or "maximum context length" not in msg:
                raise Failed(f"a {n}-token prompt past the {limit}-token cap got HTTP {status}: {msg}")
            self.notes.append(f"context capped at {limit} (sliding_window {window}): a {n}-token prompt is a 400 "
                              f"({msg!r}); the long-prompt check ran at {limit - LONG_GEN_TOKENS} tokens")
            n = limit - LONG_GEN_TOKENS
        ids = long_token_ids(self.tok, n)
        r, s = self.parallel([
            ("/v1/completions", {"model": "m", "prompt": ids, "max_tokens": LONG_GEN_TOKENS, "temperature": 1.0,
                                 "seed": 7, "ignore_eos": True, "logprobs_mode": "raw"},
             f"{len(ids)}-token completion"),
            ("/v1/logprobs", {"token_ids": ids, "start": 1, "logprobs_mode": "raw"}, f"/v1/logprobs over {len(ids)} tokens"),
        ])
        c = r["choices"][0]
        gen = c.get("generation_token_ids") or c.get("token_ids")
        lps = c.get("generation_log_probs")
        if gen is None or lps is None:
            raise Failed(f"/v1/completions choice has no generation_token_ids/generation_log_probs: {sorted(c)}")
        # One forward over prompt + generation scores both.
        lp = self.compare(ids, gen, lps, "long", self.gen_diffs)
        ours = s["token_logprobs"]
        if len(ours) != len(ids) - 1:
            raise Failed(f"/v1/logprobs returned {len(ours)} values for {len(ids) - 1} positions")
        theirs = lp[: len(ids) - 1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].double()
        self.score_diffs.extend((theirs - torch.tensor(ours, dtype=torch.float64)).abs().tolist())
        return len(ids)


def check_one(binary, ckpt, tol, workdir):
    ckpt = Path(ckpt)
    meta_path = ckpt / "parity_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    name, layout = meta.get("name", ckpt.name), meta.get("layout", "?")
    may_refuse = meta.get("may_refuse", [])
    res = {"name": name, "layout": layout, "dir": str(ckpt), "status": "FAIL"}
    started = time.time()
    server = Server(binary, ckpt, Path(workdir) / f"{ckpt.name}.log")
    try:
        if server.url is None:
            err = server.stderr().strip().splitlines()
            last = err[-1] if err else "(no output)"
            if may_refuse and any(f in "\n".join(err) for f in may_refuse):
                res.update(status="REFUSED", reason=f"load refused: {last}")
            else:
                res.update(reason=f"server did not start: {last}")
            return res
        c = Checker(server, ckpt, tol, may_refuse, meta)
        try:
            res["chat_prompts_equal"] = f"{c.chat_tokens()}/{len(CONVERSATIONS)}"
            res["greedy_equal"] = f"{c.greedy()}/{len(GREEDY_PROMPTS)}"
            res["sampled_tokens"] = c.sampled()
            res["long_prompt_tokens"] = c.long()
        except Refused as e:
            res.update(status="REFUSED", reason=str(e))
            return res
        except Failed as e:
            c.failures.append(str(e))
        g = c.gen_diffs
        res["tokens_compared"] = len(g)
        res["max_abs_diff"] = max(g) if g else None
        res["token_mult_prob_error"] = sum(math.exp(d) for d in g) / len(g) if g else None
        res["exp_mean_abs_diff"] = math.exp(sum(g) / len(g)) if g else None
        res["score_positions"] = len(c.score_diffs)
        res["score_max_abs_diff"] = max(c.score_diffs) if c.score_diffs else None
        if g and res["max_abs_diff"] > tol:
            c.failures.append(f"max |log-prob diff| {res['max_abs_diff']:.3g} > {tol}")
        if g and res["token_mult_prob_error"] > 1.001:
            c.failures.append(f"token_mult_prob_error {res['token_mult_prob_error']:.5f} > 1.001")
        if c.score_diffs and res["score_max_abs_diff"] > tol:
            c.failures.append(f"/v1/logprobs over the long prompt: max |diff| {res['score_max_abs_diff']:.3g} > {tol}")
        if "long_prompt_tokens" in res and res["long_prompt_tokens"] < LONG_PROMPT_TOKENS:
            res["long_prompt_tokens"] = f"{res['long_prompt_tokens']} (capped)"
        if res.get("sampled_tokens", 0) < 500:
            c.failures.append(f"only {res.get('sampled_tokens', 0)} sampled tokens compared (< 500)")
        res["notes"] = c.notes
        res["failures"] = c.failures
        res["status"] = "FAIL" if c.failures else "PASS"
        return res
    finally:
        server.stop()
        res["seconds"] = round(time.time() - started, 1)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--json", help="write every figure to this file")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = []
    with tempfile.TemporaryDirectory(prefix="parity-") as work:
        for ckpt in a.ckpts:
            r = check_one(a.binary, ckpt, a.tolerance, work)
            results.append(r)
            line = (f"{r['status']:7} {r['name']:24} {r['layout']:3}  tokens={r.get('tokens_compared', '-')} "
                    f"max|diff|={fmt(r.get('max_abs_diff'), '.3g')} "
                    f"token_mult_prob_error={fmt(r.get('token_mult_prob_error'), '.5f')} "
                    f"greedy={r.get('greedy_equal', '-')} chat_prompts={r.get('chat_prompts_equal', '-')} "
                    f"long={r.get('long_prompt_tokens', '-')} (/v1/logprobs max|diff|={fmt(r.get('score_max_abs_diff'), '.3g')}) "
                    f"{r['seconds']}s")
            print(line, flush=True)
            if r.get("reason"):
                print(f"        {r['reason']}", flush=True)
            for f in r.get("failures", [])[:8]:
                print(f"        FAIL: {f}", flush=True)
            for n in r.get("notes", []):
                print(f"        note: {n}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    failed = [r for r in results if r["status"] == "FAIL"]
    if failed:
        print(f"parity check FAILED for {len(failed)} of {len(results)} checkpoints: "
              + ", ".join(f"{r['name']} ({r['layout']})" for r in failed))
        sys.exit(1)
    capped = sum("capped" in str(r.get("long_prompt_tokens", "")) for r in results)
    print(f"parity check passed: {len(results)} checkpoints "
          f"({sum(r['status'] == 'REFUSED' for r in results)} refused by name, {capped} with the context capped at a "
          f"sliding window)")


if __name__ == "__main__":
    main()
