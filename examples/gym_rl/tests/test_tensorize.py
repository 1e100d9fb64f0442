"""Tensorization and the prefix check, on rollouts recorded from gym-serve (fixtures/rollouts.json)."""
import copy
import json
import os

import pytest
import torch

import gym_wire
import loss
import tensorize

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "rollouts.json")


@pytest.fixture(scope="module")
def recorded():
    with open(FIXTURE) as f:
        return json.load(f)["rollouts"]


def model_items(result):
    return [i for i in result["response"]["output"] if "generation_token_ids" in i]


def test_recorded_rollouts_are_multi_turn(recorded):
    assert all(len(model_items(r["result"])) >= 2 for r in recorded)


def test_sample_is_the_last_turn_with_generated_tokens_masked(recorded):
    for r in recorded:
        items = model_items(r["result"])
        sample = tensorize.to_sample(r["result"])
        last = items[-1]
        # Everything the rollout saw is the last turn's prompt + its generation.
        assert sample.token_ids == last["prompt_token_ids"] + last["generation_token_ids"]
        generated = [t for item in items for t in item["generation_token_ids"]]
        assert [t for t, m in zip(sample.token_ids, sample.loss_mask) if m] == generated
        logprobs = [lp for item in items for lp in item["generation_log_probs"]]
        assert [lp for lp, m in zip(sample.behaviour_log_probs, sample.loss_mask) if m] == logprobs
        assert all(lp == 0.0 for lp, m in zip(sample.behaviour_log_probs, sample.loss_mask) if not m)
        assert sample.reward == r["result"]["reward"]


def test_turns_split_like_nemo_rl():
    # NeMo RL's own example: turn 2's prompt repeats turn 1's prompt and generation.
    result = {"reward": 1.0, "_ng_task_index": 0, "response": {"output": [
        {"prompt_token_ids": [1, 2], "generation_token_ids": [3], "generation_log_probs": [-0.1]},
        {"type": "function_call_output", "output": "tool says hi"},
        {"prompt_token_ids": [1, 2, 3, 4, 5], "generation_token_ids": [6, 7], "generation_log_probs": [-0.2, -0.3]},
    ]}}
    turns = tensorize.turns(result)
    assert [(t.new_prompt_ids, t.generation_ids) for t in turns] == [([1, 2], [3]), ([4, 5], [6, 7])]
    sample = tensorize.to_sample(result)
    assert sample.token_ids == [1, 2, 3, 4, 5, 6, 7]
    assert sample.loss_mask == [0, 0, 1, 0, 0, 1, 1]
    assert sample.behaviour_log_probs == [0.0, 0.0, -0.1, 0.0, 0.0, -0.2, -0.3]


def test_retokenized_history_fails_loudly(recorded):
    result = copy.deepcopy(recorded[1]["result"])
    items = model_items(result)
    # Turn 2's prompt as a server that re-tokenized turn 1's text might send it:
    # the same text, one generated token split differently.
    seen = len(items[0]["prompt_token_ids"])
    prompt = items[1]["prompt_token_ids"]
    items[1]["prompt_token_ids"] = prompt[:seen] + [prompt[seen] + 1] + prompt[seen + 1:]
    with pytest.raises(tensorize.PrefixError, match=f"first difference at token {seen}"):
        tensorize.to_sample(result)


def test_truncated_history_fails_loudly(recorded):
    result = copy.deepcopy(recorded[0]["result"])
    items = model_items(result)
    items[1]["prompt_token_ids"] = items[1]["prompt_token_ids"][5:]  # history cut at the front
    with pytest.raises(tensorize.PrefixError, match="do not start with the previous turns"):
        tensorize.to_sample(result)


def test_partial_token_data_fails(recorded):
    result = copy.deepcopy(recorded[0]["result"])
    model_items(result)[0]["generation_log_probs"].pop()
    with pytest.raises(ValueError, match="generation_log_probs"):
        tensorize.to_sample(result)


def test_collate_pads_right(recorded):
    samples = [tensorize.to_sample(r["result"]) for r in recorded]
    batch = tensorize.collate(samples)
    lengths = [len(s.token_ids) for s in samples]
    assert batch["input_ids"].shape == (len(samples), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["loss_mask"].sum().item() == sum(sum(s.loss_mask) for s in samples)
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()


def test_recorded_response_token_sources_agree(recorded):
    for r in recorded:
        raw = r["raw_first_call"]
        turn = gym_wire.read_choice(raw, {"uses_reasoning_parser": True})
        assert turn["generation_token_ids"] == raw["choices"][0]["token_ids"]
        assert len(turn["generation_log_probs"]) == len(turn["generation_token_ids"])


@pytest.mark.parametrize("tamper", ["top_level_prompt", "logprobs_token", "drop_field"])
def test_disagreeing_token_sources_fail(recorded, tamper):
    raw = copy.deepcopy(recorded[0]["raw_first_call"])
    choice = raw["choices"][0]
    if tamper == "top_level_prompt":
        raw["prompt_token_ids"][-1] += 1
    elif tamper == "logprobs_token":
        choice["logprobs"]["content"][0]["token"] = "token_id:999999"
    else:
        del choice["message"]["generation_log_probs"]
    with pytest.raises(gym_wire.TokenTransportError):
        gym_wire.read_choice(raw, {})


def test_grpo_advantages_are_group_relative():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1])
    adv = loss.grpo_advantages(rewards, groups)
    # Group 0: mean 0.5, sample std sqrt(0.5); group 1: all equal, no signal.
    assert torch.allclose(adv, torch.tensor([0.5 / 0.5 ** 0.5, -0.5 / 0.5 ** 0.5, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(loss.grpo_advantages(rewards, groups, normalize_std=False), torch.tensor([0.5, -0.5, 0, 0]))


def test_clipped_loss_and_truncated_importance_sampling():
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    behaviour = torch.tensor([[0.0, -1.0, -2.0]])
    adv = torch.tensor([2.0])
    # On-policy (trainer == generator): ratio 1, loss = -advantage per token.
    value, clipped = loss.clipped_pg_loss(behaviour.clone(), behaviour, adv, mask, 0.2, 0.2)
    assert value.item() == pytest.approx(-2.0) and clipped == 0
    # Ratio e^0.5 > 1.2 with a positive advantage: clipped to 1.2.
    lp = behaviour + torch.tensor([[0.0, 0.5, 0.0]])
    value, clipped = loss.clipped_pg_loss(lp, behaviour, adv, mask, 0.2, 0.2)
    assert value.item() == pytest.approx(-(1.2 * 2 + 1.0 * 2) / 2) and clipped == 1
    # TIS: ratio against the trainer's own log-probs, weight min(exp(trainer - generator), cap).
    trainer = behaviour + torch.tensor([[0.0, 1.0, -0.1]])
    value, _ = loss.clipped_pg_loss(trainer.clone(), behaviour, adv, mask, 0.2, 0.2, tis_cap=2.0,
                                    old_train_lp=trainer)
    assert value.item() == pytest.approx(-(2.0 * 2 + torch.exp(torch.tensor(-0.1)).item() * 2) / 2, rel=1e-6)


def test_token_mult_prob_error():
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    a = torch.tensor([[5.0, -1.0, -2.0]])
    assert loss.token_mult_prob_error(a, a.clone(), mask) == pytest.approx(1.0)
    b = a + torch.tensor([[3.0, 0.1, -0.1]])  # column 0 is masked out
    assert loss.token_mult_prob_error(a, b, mask) == pytest.approx(float(torch.exp(torch.tensor(0.1))), rel=1e-6)
