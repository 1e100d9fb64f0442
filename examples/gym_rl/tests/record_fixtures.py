#!/usr/bin/env python3
"""Record the rollouts the unit tests replay (tests/fixtures/rollouts.json) from a real gym-serve.

    python examples/gym_rl/tests/record_fixtures.py target/debug/gym-serve

It makes a tiny seeded model, serves it, runs one rollout of each task in
data/tasks.jsonl as the loop does (Gym's wire format, multi-turn, tools), and
keeps for each rollout the Gym result and the raw chat completion of its first
model call (for the token-source cross-checks).
"""
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import config  # noqa: E402
import environment  # noqa: E402
import gym_wire  # noqa: E402
import rollouts  # noqa: E402
import servers  # noqa: E402


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as work:
        cfg = config.load(os.path.join(os.path.dirname(HERE), "config.yaml"), {
            "server": {"binary": binary, "model": os.path.join(work, "tiny"), "replicas": 1},
            "rollout": {"max_tokens": 8},
        })
        tasks = environment.load_tasks(cfg.rollout.dataset)
        out = {"model": "gym-serve make-model " + " ".join(cfg.server.make_model), "rollouts": []}
        with servers.replicas(cfg.server) as (url,):
            vllm = {**cfg.vllm_model, "model": cfg.server.served_model_name}
            for i, task in enumerate(tasks):
                result = rollouts.run_episode(url, task, i, 0, cfg, seed=100 + i)
                params = task["responses_create_params"]
                body = gym_wire.chat_request(gym_wire.input_messages(params["input"], vllm),
                                             gym_wire.chat_tools(params.get("tools")), vllm, 8, 1.0, 7)
                body["return_token_ids"] = True
                raw = rollouts.post_json(f"{url}/v1/chat/completions", body)
                out["rollouts"].append({"result": result, "raw_first_call": raw})
    path = os.path.join(HERE, "fixtures", "rollouts.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}: {len(out['rollouts'])} rollouts, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
