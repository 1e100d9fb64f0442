"""Rollouts -> training tensors, the way NeMo RL's Gym integration does it.

NeMo RL (nemo_rl/environments/nemo_gym.py, `_postprocess_nemo_gym_to_nemo_rl_result`)
walks a rollout's output items and keeps those that carry `generation_token_ids`:
each model turn becomes a "user" message (the part of its `prompt_token_ids`
not seen before: the new template text, tool results, follow-ups) and an
"assistant" message (its `generation_token_ids`, with `generation_log_probs`
as the behaviour policy's log-probs). The rollout is the concatenation, so the
trainer scores one sequence per rollout; the loss mask covers generated tokens
only. That is only right if every turn's prompt starts with everything seen
before (previous prompt + generation); when it does not, training would score
tokens the model never saw, so it fails loudly.
"""
from dataclasses import dataclass

import torch


class PrefixError(ValueError):
    """A turn's prompt does not start with the previous turns' tokens."""


@dataclass
class Turn:
    new_prompt_ids: list    # prompt tokens not in earlier turns
    generation_ids: list
    generation_log_probs: list


@dataclass
class Sample:
    token_ids: list         # the whole rollout
    loss_mask: list         # 1 on generated tokens
    behaviour_log_probs: list  # gym-serve's log-prob on generated tokens, 0 elsewhere
    reward: float
    group: int              # the task: GRPO normalizes within it


def turns(result):
    """The model turns of one Gym result, each prompt checked against the tokens seen before it."""
    seen, out = [], []
    for k, item in enumerate(result["response"]["output"]):
        if "generation_token_ids" not in item:
            continue
        prompt = item["prompt_token_ids"]
        if prompt[:len(seen)] != seen:
            at = next((i for i, (a, b) in enumerate(zip(prompt, seen)) if a != b), min(len(prompt), len(seen)))
            raise PrefixError(
                f"output item {k}: prompt_token_ids ({len(prompt)} tokens) do not start with the previous "
                f"turns' prompt + generation ({len(seen)} tokens); first difference at token {at}: "
                f"prompt has {prompt[at:at + 8]}, history has {seen[at:at + 8]}. The server re-tokenized "
                f"earlier turns instead of reusing their tokens (or history was truncated)")
        gen, lps = item["generation_token_ids"], item["generation_log_probs"]
        if len(gen) != len(lps):
            raise ValueError(f"output item {k}: {len(gen)} generation_token_ids but {len(lps)} generation_log_probs")
        out.append(Turn(prompt[len(seen):], list(gen), list(lps)))
        seen = prompt + gen
    if not out:
        raise ValueError("rollout has no model turn with token IDs (was return_token_id_information on?)")
    return out


def to_sample(result):
    ids, mask, lps = [], [], []
    for t in turns(result):
        ids += t.new_prompt_ids + t.generation_ids
        mask += [0] * len(t.new_prompt_ids) + [1] * len(t.generation_ids)
        lps += [0.0] * len(t.new_prompt_ids) + t.generation_log_probs
    return Sample(ids, mask, lps, float(result["reward"]), int(result["_ng_task_index"]))


def collate(samples, pad_id=0):
    """Right-padded [B, T] tensors: input_ids, attention_mask, loss_mask, behaviour_log_probs."""
    width = max(len(s.token_ids) for s in samples)

    def pad(rows, value, dtype):
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=dtype)

    return {
        "input_ids": pad([s.token_ids for s in samples], pad_id, torch.long),
        "attention_mask": pad([[1] * len(s.token_ids) for s in samples], 0, torch.long),
        "loss_mask": pad([s.loss_mask for s in samples], 0, torch.float32),
        "behaviour_log_probs": pad([s.behaviour_log_probs for s in samples], 0.0, torch.float32),
        "rewards": torch.tensor([s.reward for s in samples], dtype=torch.float32),
        "groups": torch.tensor([s.group for s in samples], dtype=torch.long),
    }
