#!/usr/bin/env python3
"""Check that a `gym-serve make-model` checkpoint loads unchanged in Python
transformers and that gym-serve computes what transformers computes.

For each architecture it makes a fixture, then with transformers:
  * AutoTokenizer / AutoModelForCausalLM load the directory as written;
  * apply_chat_template renders a multi-turn tool-calling conversation (with
    reasoning, a tools block and enable_thinking=False) to the same token IDs
    gym-serve's chat template produces;
  * greedy decoding picks the same token IDs, and the log-probs gym-serve
    reports equal transformers' log_softmax within 1e-4.

Usage: check_transformers.py GYM_SERVE_BINARY WORK_DIR
"""
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temperature\": 21}"},
]


def gym(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return out.stdout


def check(binary, work, arch, extra):
    ckpt = work / arch
    gym(binary, "make-model", "--out", str(ckpt), "--arch", arch, "--seed", "5", *extra)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.eval()

    (work / "messages.json").write_text(json.dumps(MESSAGES))
    (work / "tools.json").write_text(json.dumps(TOOLS))
    ours = json.loads(gym(binary, "generate", "--model", str(ckpt), "--messages", str(work / "messages.json"),
                          "--tools", str(work / "tools.json"), "--enable-thinking", "false",
                          "--temperature", "0", "--max-tokens", "12", "--logprobs-mode", "raw", "--json"))
    theirs = tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, enable_thinking=False,
                                     tokenize=True, return_dict=False)
    if hasattr(theirs, "input_ids"):
        theirs = theirs["input_ids"]
    assert ours["prompt_token_ids"] == list(theirs), f"{arch}: chat prompt IDs differ\n{ours['prompt_token_ids']}\n{list(theirs)}"

    choice = ours["choices"][0]
    ids = ours["prompt_token_ids"] + choice["generation_token_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    n_prompt = len(ours["prompt_token_ids"])
    worst = 0.0
    for i, (tid, lp) in enumerate(zip(choice["generation_token_ids"], choice["generation_log_probs"])):
        row = logp[n_prompt - 1 + i]
        assert int(row.argmax()) == tid, f"{arch}: greedy token {i} differs: ours {tid}, transformers {int(row.argmax())}"
        worst = max(worst, abs(float(row[tid]) - lp))
    assert worst < 1e-4, f"{arch}: log-prob differs by {worst}"

    text = "Hello! The answer is 42. <think>ok</think> <tool_call>{}</tool_call>"
    ours_ids = tok(text)["input_ids"]
    assert tok.decode(ours_ids) == text, f"{arch}: decode does not round-trip"
    print(f"ok {arch}: {len(ids)} tokens, greedy IDs equal, max |log-prob diff| = {worst:.2e}")


def main():
    binary, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    check(binary, work, "qwen3", [])
    check(binary, work, "qwen2", ["--tie-word-embeddings", "true"])
    check(binary, work, "llama", ["--dtype", "bf16", "--shards", "2"])
    print("transformers check passed")


if __name__ == "__main__":
    main()
