#!/usr/bin/env python3
"""`--compute-dtype bf16` on a real trained model, against transformers in fp32 and bf16.

Starts the real server twice on one checkpoint (SmolLM2-135M-Instruct as
make_checkpoints.py writes it): with `--compute-dtype bf16` (activations
rounded to bf16 for every projection, the CPU's BF16 dot products or AMX
tiles) and with the exact f32 default. Samples chat completions at
temperature 1 from the bf16 server and checks, or reports:

  * /v1/models says `compute_dtype: "bf16"` and `deterministic: true`;
  * the bf16 server's generation log-probs equal its own /v1/logprobs over
    the same tokens bit for bit (the in-server token_mult_prob_error is
    exactly 1: the mode is still batch-invariant);
  * token_mult_prob_error (NeMo RL's: mean of exp(|lp_gen - lp_train|)) of
    its log-probs against transformers fp32, transformers bf16
    (`model.to(torch.bfloat16)`, what a bf16 trainer computes) and the
    exact f32 server, with the max |diff|; and, for scale, the f32 server's
    against transformers fp32. It fails if the bf16 mode's error against
    transformers fp32 exceeds --max-error (default 1.05).

On a CPU with neither AVX512-BF16 nor AMX-BF16 the server refuses the mode;
the script checks the refusal's message and reports SKIPPED.

Usage: check_bf16_products.py GYM_SERVE_BINARY CKPT_DIR [--json OUT] [--max-error 1.05]
"""
import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_parity import SAMPLE_PROMPTS, Server, error_message  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

TOKENS = 96  # x 2 choices x 3 prompts


def post(server, path, body):
    status, resp = server.post(path, body)
    if status != 200:
        sys.exit(f"check_bf16_products: {path}: HTTP {status}: {error_message(resp)}")
    return resp


def tmpe(a, b):
    """(token_mult_prob_error, max |diff|) of two equal-length log-prob lists."""
    d = [abs(x - y) for x, y in zip(a, b)]
    return sum(math.exp(x) for x in d) / len(d), max(d)


@torch.no_grad()
def transformers_logprobs(model, prompt, gen):
    ids = torch.tensor([list(prompt) + list(gen)])
    lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = lp[len(prompt) - 1: len(prompt) - 1 + len(gen)]
    return rows.gather(1, torch.tensor(gen)[:, None])[:, 0].double().tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("ckpt")
    ap.add_argument("--max-error", type=float, default=1.05)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bf16-products-") as work:
        bf16 = Server(a.binary, a.ckpt, Path(work) / "bf16.log", ["--compute-dtype", "bf16"])
        if bf16.url is None:
            err = bf16.stderr()
            bf16.stop()
            if "needs a CPU with" in err:
                print("SKIPPED --compute-dtype bf16: " + err.strip().splitlines()[-1])
                return
            sys.exit("check_bf16_products: the bf16 server did not start:\n" + err[-2000:])
        try:
            card = bf16.get("/v1/models")["data"][0]
            if card.get("compute_dtype") != "bf16" or card.get("deterministic") is not True:
                sys.exit(f"check_bf16_products: /v1/models says {card}")
            rollouts = []
            for prompt, seed in SAMPLE_PROMPTS:
                r = post(bf16, "/v1/chat/completions", {
                    "model": "m", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": TOKENS, "temperature": 1.0, "seed": seed, "n": 2,
                    "ignore_eos": True, "logprobs": True, "logprobs_mode": "raw"})
                for c in r["choices"]:
                    m = c["message"]
                    rollouts.append((m["prompt_token_ids"], m["generation_token_ids"], m["generation_log_probs"]))
            scored_bits_equal = True
            for p, g, lps in rollouts:
                s = post(bf16, "/v1/logprobs", {"token_ids": p + g, "start": len(p), "temperature": 1.0,
                                                "logprobs_mode": "raw"})
                f32 = lambda v: [float(torch.tensor(x, dtype=torch.float32)) for x in v]  # noqa: E731
                scored_bits_equal &= f32(s["token_logprobs"]) == f32(lps)
        finally:
            bf16.stop()
        exact = Server(a.binary, a.ckpt, Path(work) / "f32.log")
        try:
            exact_lps = [post(exact, "/v1/logprobs", {"token_ids": p + g, "start": len(p), "temperature": 1.0,
                                                      "logprobs_mode": "raw"})["token_logprobs"]
                         for p, g, _ in rollouts]
        finally:
            exact.stop()
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32).eval()
    hf32 = [transformers_logprobs(model, p, g) for p, g, _ in rollouts]
    model = model.to(torch.bfloat16)
    hf16 = [transformers_logprobs(model, p, g) for p, g, _ in rollouts]
    flat = lambda v: [x for row in v for x in row]  # noqa: E731
    ours = flat([lps for _, _, lps in rollouts])
    res = {"tokens": len(ours), "generation_equals_scoring_bitwise": scored_bits_equal}
    for name, ref in (("transformers_fp32", flat(hf32)), ("transformers_bf16", flat(hf16)),
                      ("gym_serve_f32", flat(exact_lps))):
        res[f"bf16_mode_vs_{name}"] = tmpe(ours, ref)
    res["f32_mode_vs_transformers_fp32"] = tmpe(flat(exact_lps), flat(hf32))
    res["transformers_bf16_vs_fp32"] = tmpe(flat(hf16), flat(hf32))
    for k, v in res.items():
        print(f"{k}: " + (f"token_mult_prob_error {v[0]:.5f}, max |diff| {v[1]:.3g}" if isinstance(v, tuple) else str(v)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    failures = []
    if not scored_bits_equal:
        failures.append("generation log-probs differ from /v1/logprobs")
    if res["bf16_mode_vs_transformers_fp32"][0] > a.max_error:
        failures.append(f"token_mult_prob_error vs transformers fp32 above {a.max_error}")
    print("FAIL: " + "; ".join(failures) if failures else "PASS")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
