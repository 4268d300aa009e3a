#!/usr/bin/env bash
# Compile every CUDA source of the native extension (csrc/cuda/*.cu) with nvcc -c for sm_80 and sm_90, so CUDA
# code that does not compile fails CI on machines without a GPU. The kernels need only the CUDA toolkit (no torch
# headers). Objects go to a temporary directory that is removed afterwards.
#   NVCC=/path/to/nvcc .ci/nvcc_check.sh    (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
#   FASTDIFF_NVCC_OPTIONAL=1                skip (exit 0) when no nvcc is installed, instead of failing
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then nvcc="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$nvcc" ]]; then
  if [[ "${FASTDIFF_NVCC_OPTIONAL:-0}" == "1" ]]; then echo "nvcc_check: no nvcc found; skipped"; exit 0; fi
  echo "nvcc_check: no nvcc found (set NVCC or CUDA_HOME, or FASTDIFF_NVCC_OPTIONAL=1 to skip)" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then echo "nvcc_check: no csrc/cuda/*.cu sources" >&2; exit 1; fi

echo "nvcc_check: $("$nvcc" --version | tail -n 1)"
for src in "${sources[@]}"; do
  "$nvcc" -c -std=c++17 -O3 -Icsrc \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
    -o "$out/$(basename "$src" .cu).o" "$src"
  echo "nvcc_check: ok $src (sm_80, sm_90)"
done
