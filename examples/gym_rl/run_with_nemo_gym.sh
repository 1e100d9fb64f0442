#!/usr/bin/env bash
# The same loop with NeMo Gym 0.7.0 itself collecting the rollouts (not run in CI:
# nemo-gym 0.7.0 requires Python >= 3.13.14; CI machines have 3.11).
#
#   PYTHON=python3.13 MODEL=models/out/gym_rl_tiny examples/gym_rl/run_with_nemo_gym.sh
#
# 1. gym-serve serves MODEL as `policy` on :8000 (the loop pushes to it);
# 2. the `nemo_gym` section of config.yaml becomes Gym's config: the vllm_model
#    server pointed at gym-serve with return_token_id_information and
#    replace_developer_role_with_system on;
# 3. `gym env start` runs Gym's servers (Ray, the vllm_model server, the offline
#    example_multi_turn_gymnasium environment and its agent);
# 4. train.py --source nemo_gym runs `gym eval run --no-serve` for each step's
#    rollouts (GRPO groups via --num-repeats) and trains on Gym's output rows.
# For example_single_tool_call, set rollout.gym_agent to
# example_single_tool_call_simple_agent and start that resources server instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.13}
MODEL=${MODEL:-models/out/gym_rl_tiny}
BIN=${BIN:-target/release/gym-serve}
VENV=${VENV:-.venv-nemo-gym}
ENVIRONMENT=${ENVIRONMENT:-example_multi_turn_gymnasium}

if [ ! -x "$VENV/bin/gym" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install "nemo-gym==0.7.0" torch transformers safetensors pyyaml
fi
[ -f "$MODEL/config.json" ] || "$BIN" make-model --out "$MODEL" --preset tiny --seed 7

"$BIN" --model "$MODEL" --served-model-name policy --port 8000 \
  --reasoning-parser qwen3 --tool-call-parser hermes &
serve_pid=$!
gym_config=$(mktemp --suffix .yaml)
"$VENV/bin/python" -c 'import sys, yaml; print(yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["nemo_gym"]))' \
  examples/gym_rl/config.yaml > "$gym_config"
"$VENV/bin/gym" env start --config "$gym_config" --resources-server "$ENVIRONMENT" &
gym_pid=$!
trap 'kill $gym_pid $serve_pid 2>/dev/null; rm -f "$gym_config"' EXIT

until curl -sf localhost:8000/health >/dev/null; do sleep 1; done
echo "waiting for Gym's servers (gym env status)..."
until "$VENV/bin/gym" env status --json 2>/dev/null | grep -q '"name"'; do sleep 5; done

PATH="$VENV/bin:$PATH" "$VENV/bin/python" examples/gym_rl/train.py --config examples/gym_rl/config.yaml \
  --source nemo_gym --url http://127.0.0.1:8000 --model "$MODEL" --log gym_rl_steps.jsonl
