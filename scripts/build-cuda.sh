#!/usr/bin/env bash
# Builds gym-serve's `cuda` feature on a machine without a GPU or a system CUDA,
# from NVIDIA's CUDA 13.0 toolkit wheels on PyPI (pinned by version and hash).
#
#   scripts/build-cuda.sh            # cargo check --features cuda --all-targets (minutes:
#                                    #   candle's kernels are not compiled, see nvcc-check-only)
#   scripts/build-cuda.sh release    # cargo build --release --features cuda --bin gym-serve
#   scripts/build-cuda.sh env        # only install the toolkit; print the exports
#
# The toolkit goes to ${GYM_SERVE_CUDA_HOME:-$HOME/.cache/gym-serve/cuda} and
# the build to ${GYM_SERVE_CUDA_TARGET_DIR:-$HOME/.cache/gym-serve/target-cuda},
# both outside the clone, so a second run only rebuilds what changed.
# CUDA_COMPUTE_CAP (default 90: H100/H200) picks what candle's kernels and
# ours are compiled for.
#
# No wheel ships the driver (libcuda.so.1 comes with the NVIDIA driver on a GPU
# machine), and cudarc, as candle enables it, links libcuda at build time
# (its `dynamic-linking` feature, not run-time loading), so a link-only
# stub libcuda.so with the driver API's symbols is built from cuda.h. It lives
# in lib/stubs and must never be on a run-time library path.
set -euo pipefail
mode=${1:-check}
case "$mode" in check | release | env) ;; *)
  echo "usage: $0 [check|release|env]" >&2
  exit 2
  ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${GYM_SERVE_CUDA_HOME:-$HOME/.cache/gym-serve/cuda}
target_dir=${GYM_SERVE_CUDA_TARGET_DIR:-$HOME/.cache/gym-serve/target-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# CUDA 13.0 Update 2. nvvm (cicc) must match nvcc exactly.
requirements="\
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-nvrtc==13.0.88 --hash=sha256:ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
nvidia-cublas==13.1.0.3 --hash=sha256:ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171
nvidia-curand==10.4.0.35 --hash=sha256:1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
"
key=$(printf '%s' "$requirements" | sha256sum | cut -c1-12)
prefix="$cache/13.0-$key"
root="$prefix/nvidia/cu13"

install_toolkit() {
  local started=$SECONDS tmp
  rm -rf "$prefix"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.install.XXXXXX")
  # A bare venv only for its pip: a system Python may refuse `pip install`.
  python3 -m venv "$tmp/venv"
  printf '%s' "$requirements" >"$tmp/requirements.txt"
  "$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --progress-bar off --no-cache-dir --no-deps --require-hashes \
    --target "$tmp/prefix" -r "$tmp/requirements.txt"
  local lib="$tmp/prefix/nvidia/cu13/lib"
  # The wheels ship only versioned sonames; the linker looks for lib*.so.
  for so in "$lib"/lib*.so.*; do
    local base=${so##*/}
    base=${base%%.so.*}.so
    [ -e "$lib/$base" ] || ln -s "${so##*/}" "$lib/$base"
  done
  build_driver_stub "$tmp/prefix/nvidia/cu13"
  mv "$tmp/prefix" "$prefix"
  rm -rf "$tmp"
  touch "$prefix/.complete"
  echo "CUDA 13.0 toolkit installed in $prefix in $((SECONDS - started))s ($(du -sh "$prefix" | cut -f1))"
}

# Every driver entry point cuda.h declares, under the name the macros in
# cuda.h map it to (cuCtxCreate -> cuCtxCreate_v2), which is the name
# cudarc's bindings reference. The stub is never run, so each is an empty body.
build_driver_stub() {
  local root=$1 stubs="$1/lib/stubs"
  mkdir -p "$stubs"
  echo '#include <cuda.h>' | cc -E -P -I"$root/include" - |
    grep -oE '\bcu[A-Za-z0-9_]+ *\(' | tr -d ' (' | sort -u |
    sed 's/.*/void &(void) {}/' >"$stubs/libcuda_stub.c"
  local n
  n=$(wc -l <"$stubs/libcuda_stub.c")
  if [ "$n" -lt 300 ]; then
    echo "only $n driver symbols found in cuda.h; the stub would not link" >&2
    exit 1
  fi
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"
}

if [ ! -f "$prefix/.complete" ]; then
  install_toolkit
fi

export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root"
export PATH="$root/bin:$PATH"
# nvcc and the build scripts link against the toolkit's libraries, never the stub at run time.
export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="$target_dir"
nvcc --version | tail -2 | head -1

cd "$repo"
# Our kernels are compiled by NVRTC when a GPU step first needs them; compile
# them here the same way, so a broken kernel fails the build, not a GPU run.
LD_LIBRARY_PATH="$root/lib" python3 scripts/nvrtc-check.py "$root/lib/libnvrtc.so.13" src/model/cuda/*.cu
started=$SECONDS
case "$mode" in
env)
  echo "export CUDA_ROOT=$root CUDA_HOME=$root PATH=$root/bin:\$PATH CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  echo "export LIBRARY_PATH=$root/lib:$root/lib/stubs CARGO_TARGET_DIR=$target_dir"
  ;;
check)
  # candle's own kernels are not compiled for a check (scripts/nvcc-check-only
  # says why); its own target dir keeps those empty stand-ins away from builds.
  export GYM_SERVE_REAL_NVCC="$root/bin/nvcc" NVCC="$repo/scripts/nvcc-check-only"
  export CARGO_TARGET_DIR="$target_dir-check"
  cargo check --locked --features cuda --all-targets
  echo "cargo check --features cuda --all-targets done in $((SECONDS - started))s"
  ;;
release)
  cargo build --locked --release --features cuda --bin gym-serve
  echo "release build done in $((SECONDS - started))s: $target_dir/release/gym-serve"
  echo "it needs at run time: libcuda.so.1 (the driver) and, from CUDA 13, libcublas.so.13,"
  echo "libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 (e.g. LD_LIBRARY_PATH=$root/lib)"
  ;;
esac
