#!/usr/bin/env bash
# Fan-out against chained staging: N replicas on loopback, the same update
# pushed alternately with `push-weights --url ...` and `--chain`, ROUNDS each;
# prints each push's table and its time from the first byte sent to the last
# commit.
#
#   scripts/fleet-push-bench.sh BIN [WORK_DIR] [N=3] [ROUNDS=3]
#
# Two checkpoints are made in WORK_DIR (default: a temporary folder) with
# `BIN make-model --preset qwen3-0.6b-shape --layers 8` (1.1 GB each) unless
# there; every replica holds two copies of the weights while a stage is held.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n 2,11p "$0"
  exit 2
fi
bin=$(realpath "$1")
work=${2:-$(mktemp -d)}
n=${3:-3}
rounds=${4:-3}
key=bench-key
cd "$work"
for seed in 0 1; do
  [ -f "w$seed/model.safetensors" ] ||
    "$bin" make-model --out "w$seed" --preset qwen3-0.6b-shape --layers 8 --seed "$seed" 2>/dev/null
done
export RUST_LOG=warn RUST_BACKTRACE=0
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for i in $(seq "$n"); do
  "$bin" --model w0 --port 0 --replica-id "r$i" --admin-api-key "$key" \
    --max-weights-bytes 4000000000 >"replica$i.out" 2>"replica$i.err" &
  pids+=($!)
done
urls=()
for i in $(seq "$n"); do
  until [ -s "replica$i.out" ]; do sleep 0.5; done
  urls+=(--url "$(head -1 "replica$i.out" | sed 's/^gym-serve listening on //')")
done
for round in $(seq "$rounds"); do
  for mode in fan-out chain; do
    extra=()
    [ "$mode" = chain ] && extra=(--chain)
    echo "== round $round, $mode"
    "$bin" push-weights "${urls[@]}" --file "w$((round % 2))/model.safetensors" \
      --version "$mode-$round" --admin-api-key "$key" "${extra[@]}" 2>&1 | grep -v '^\s*$'
  done
done
