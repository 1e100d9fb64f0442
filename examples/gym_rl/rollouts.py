"""Collecting a step's rollouts: GRPO groups of `group_size` rollouts per task, in Gym's result format.

Every rollout is a dict shaped like a row of `gym eval run --output` (so the
tensorizer cannot tell the two sources apart): `responses_create_params`,
`response.output` (Gym output items, the token fields on each model turn's
last item), `reward`, `_ng_task_index`, `_ng_rollout_index`, plus
`weight_versions`, the version on each model call's response.
"""
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import environment
import gym_wire


class ContextOverflow(RuntimeError):
    pass


def post_json(url, body, api_key=None, timeout=600):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        if e.code == 400 and "maximum context length" in text:
            raise ContextOverflow(text) from None
        raise RuntimeError(f"POST {url}: HTTP {e.code}: {text}") from None


def run_episode(base_url, task, task_index, rollout_index, cfg, seed, api_key=None):
    """One rollout of `task` against one gym-serve replica, the way Gym's agent + vllm_model run it."""
    # Gym's `model: ${policy_model_name}` is an interpolation; here the replica's served name is used.
    vllm = {**cfg.vllm_model, "model": cfg.server.served_model_name}
    params = task["responses_create_params"]
    tools = gym_wire.chat_tools(params.get("tools"))
    messages = gym_wire.input_messages(params["input"], vllm)
    output, versions, called, final_text, truncated = [], [], [], "", False
    for model_turn in range(1, cfg.rollout.max_turns + 1):
        body = gym_wire.chat_request(messages, tools, vllm, cfg.rollout.max_tokens, cfg.rollout.temperature,
                                     seed * 1000 + model_turn)
        try:
            response = post_json(f"{base_url}/v1/chat/completions", body, api_key)
        except ContextOverflow:
            truncated = True  # Gym ends the rollout with an empty length turn here
            break
        versions.append(response.get("weight_version"))
        turn = gym_wire.read_choice(response, vllm)
        output.extend(gym_wire.output_items(turn))
        messages.append(gym_wire.replay_assistant(turn, vllm))
        final_text = gym_wire.THINK.sub("", turn["content"])
        if turn["tool_calls"]:
            for call in turn["tool_calls"]:
                called.append(call["name"])
                result = environment.call_tool(call["name"], call["arguments"])
                output.append({"type": "function_call_output", "call_id": call["call_id"], "output": result})
                messages.append({"role": "tool", "tool_call_id": call["call_id"], "content": result})
            continue
        user = environment.follow_up(task, model_turn)
        if user is None:
            break
        output.append({"type": "message", "role": "user", "content": user})
        messages.append({"role": "user", "content": user})
    return {
        "responses_create_params": params,
        "response": {"output": output},
        "reward": environment.reward(task, final_text, called),
        "_ng_task_index": task_index,
        "_ng_rollout_index": rollout_index,
        "weight_versions": versions,
        "truncated": truncated,
    }


def pick_tasks(tasks, step, count):
    """The tasks of a step: the next `count` of the dataset, wrapping around."""
    start = (step - 1) * count
    return [((start + i) % len(tasks), tasks[(start + i) % len(tasks)]) for i in range(count)]


def collect_direct(cfg, urls, tasks, step):
    """GRPO groups of every chosen task, spread over the replicas round robin, run concurrently."""
    jobs = []
    for task_index, task in pick_tasks(tasks, step, cfg.rollout.prompts_per_step):
        for r in range(cfg.rollout.group_size):
            n = len(jobs)
            seed = cfg.rollout.seed * 1_000_003 + step * 10_007 + n
            jobs.append((urls[n % len(urls)], task, task_index, r, seed))
    with ThreadPoolExecutor(max_workers=max(1, cfg.rollout.concurrency)) as pool:
        futures = [pool.submit(run_episode, url, task, ti, r, cfg, seed, cfg.server.api_key)
                   for url, task, ti, r, seed in jobs]
        return [f.result() for f in futures]


def collect_nemo_gym(cfg, urls, tasks, step):
    """The step's rollouts from NeMo Gym itself: `gym eval run --no-serve` against servers already up."""
    chosen = pick_tasks(tasks, step, cfg.rollout.prompts_per_step)
    with tempfile.TemporaryDirectory() as work:
        inp, out = os.path.join(work, "tasks.jsonl"), os.path.join(work, "rollouts.jsonl")
        with open(inp, "w") as f:
            for _, task in chosen:
                f.write(json.dumps(task) + "\n")
        subprocess.run(["gym", "eval", "run", "--no-serve", "--agent", cfg.rollout.gym_agent, "--input", inp,
                        "--output", out, "--num-repeats", str(cfg.rollout.group_size),
                        "--concurrency", str(cfg.rollout.concurrency)], check=True)
        with open(out) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:  # Gym numbers the tasks of its input file; map back to the dataset's
        row["_ng_task_index"] = chosen[row["_ng_task_index"]][0]
        row.setdefault("weight_versions", [])
    return rows


def collect(cfg, urls, tasks, step):
    if cfg.rollout.source == "nemo_gym":
        return collect_nemo_gym(cfg, urls, tasks, step)
    return collect_direct(cfg, urls, tasks, step)
