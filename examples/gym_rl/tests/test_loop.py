"""The whole loop against two real gym-serve replicas on a tiny model, a push every step.

Run: GYM_SERVE_BIN=target/debug/gym-serve pytest examples/gym_rl/tests
"""
import os

import config
import train

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("GYM_SERVE_BIN", "target/debug/gym-serve")
STEPS = 3


def test_loop_stays_on_policy_across_pushes(tmp_path):
    cfg = config.load(os.path.join(os.path.dirname(HERE), "config.yaml"), {
        "server": {"binary": BIN, "model": str(tmp_path / "tiny"), "replicas": 2},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_turns": 2, "max_tokens": 8, "concurrency": 4},
        "train": {"steps": STEPS},
        "log": str(tmp_path / "steps.jsonl"),
    })
    history = train.run(cfg)
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    for row in history:
        step = row["step"]
        # The trainer's log-probs of the sampled tokens equal gym-serve's: the
        # weights pushed after step k - 1 are exactly the trainer's.
        assert row["token_mult_prob_error"] <= 1.001, row
        # Every response of step k came from the weights pushed after step k - 1 (the initial "0" first).
        assert row["response_weight_versions"] == [str(step - 1)], row
        assert row["pushed_version"] == str(step)
        assert row["model_calls_per_rollout"] > 1, "rollouts should be multi-turn"
        assert row["grad_norm"] > 0, "the rewards gave no gradient: the pushes would not change the weights"
        assert row["rollout_s"] > 0 and row["train_s"] > 0 and row["push_s"] > 0
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == STEPS
