#!/usr/bin/env bash
# Checks that wake2vec compiles with `--features cuda` on a machine without a GPU or a system CUDA
# toolkit: CUDA 13.0's nvcc and headers come from PyPI into a venv outside the project, then
# `cargo check --release --features cuda` runs into its own target directory (candle's CUDA
# kernels are compiled to PTX by nvcc on the way). `--build` builds the binary instead.
#
#   scripts/check_cuda_build.sh            # check (13 min cold on 2 cores, ~12 s of it the install)
#   scripts/check_cuda_build.sh --build    # target/cuda/release/wake2vec, for a GPU machine
#
# CUDA_COMPUTE_CAP (default 75, the T4's Turing) is the lowest GPU generation the PTX targets;
# newer GPUs JIT-compile it. The toolkit is pinned to 13.0 because cudarc 0.19 (candle 0.11's
# CUDA layer) knows toolkits up to 13.4.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${WAKE2VEC_CUDA_VENV:-${TMPDIR:-/tmp}/wake2vec-cuda13}"
if [ ! -x "$venv/bin/nvcc-root" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
  root=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
  printf '#!/bin/sh\necho %s\n' "$root" > "$venv/bin/nvcc-root"
  chmod +x "$venv/bin/nvcc-root"
fi
root=$("$venv/bin/nvcc-root")
export PATH="$root/bin:$PATH" CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-75}"
nvcc --version | tail -1
action=check
[ "${1:-}" = "--build" ] && action=build
time cargo "$action" --release --features cuda --target-dir target/cuda
