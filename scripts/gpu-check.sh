#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: the essential server checks and
# the engine and refit benchmarks against a prebuilt binary, as one table.
#
#   scripts/gpu-check.sh BIN MODEL_DIR [--device cpu] [--budget SECONDS] [--no-bench]
#
# BIN: a `--features cuda` build (scripts/build-cuda.sh release). MODEL_DIR:
# a checkpoint; made with `BIN make-model` (qwen3-0.6b-shape, bf16) when it
# does not exist. Needs python3 (standard library only) and no network.
# `--device cpu` runs the same checks on the CPU engine (CI does, with a
# tiny model), so the script itself is tested where there is no GPU.
#
# CUDA 13's cuBLAS, cuBLASLt, cuRAND and NVRTC are looked up with ldconfig,
# then in Python's `nvidia` wheels (pip install nvidia-cublas nvidia-curand
# nvidia-cuda-nvrtc), whose lib folders are then put on LD_LIBRARY_PATH.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
bin=$(realpath "$1")
model_dir=$2
shift 2
device=gpu
for arg in "$@"; do [ "$arg" = cpu ] && device=cpu; done

# Folders of lib*.so* files inside installed `nvidia` wheels (cu13 layout
# nvidia/cu13/lib, and the older per-library nvidia/<name>/lib).
wheel_lib_dirs() {
  python3 - <<'PY' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations or []) if spec else []:
    for sub in sorted(os.listdir(root)):
        lib = os.path.join(root, sub, "lib")
        if os.path.isdir(lib):
            print(lib)
PY
}

libs=""
wheel_dirs=$(wheel_lib_dirs)
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  where=""
  if ldconfig -p 2>/dev/null | grep -q "[[:space:]]$lib "; then
    where="found by ldconfig: $(ldconfig -p | grep "[[:space:]]$lib " | head -1 | sed 's/.*=> //')"
  else
    ld_path=${LD_LIBRARY_PATH:-}
    for dir in ${ld_path//:/ } $wheel_dirs; do
      if [ -e "$dir/$lib" ]; then
        where="found in $dir"
        case ":${LD_LIBRARY_PATH:-}:" in *":$dir:"*) ;; *) export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
        break
      fi
    done
  fi
  if [ -z "$where" ]; then
    case $lib in
    libcuda.so.1) where="not found (the NVIDIA driver provides it)" ;;
    *) where="not found (pip install nvidia-cublas nvidia-curand nvidia-cuda-nvrtc for CUDA 13)" ;;
    esac
  fi
  libs+="$lib"$'\t'"$where"$'\n'
done
if [ "$device" = gpu ]; then
  if command -v nvidia-smi >/dev/null; then
    libs+="GPU"$'\t'"found: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"$'\n'
  fi
  missing=$(ldd "$bin" 2>/dev/null | grep "not found" | awk '{print $1}' | tr '\n' ' ' || true)
  [ -n "$missing" ] && libs+="ldd $bin"$'\t'"missing: $missing"$'\n'
fi
export GPU_CHECK_LIBS="$libs"
exec python3 "$(dirname "$0")/gpu_check.py" "$bin" "$model_dir" "$@"
