#!/usr/bin/env bash
# The CPU benchmark and its PyTorch peer in one run, same sizes and thread counts, then both side
# by side (bench/CPU_NOTES.md). Needs a build (scripts/build.sh) and scripts/install-deps.sh --bench.
# Usage: bash bench/run-cpu-bench.sh [L] [THREADS] [OUT_DIR]     e.g. 32768 2
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-8192}
threads=${2:-1,2}
out=${3:-out/cpu-bench}
mkdir -p "$out"
build/bench/dsa-cpu-bench --L "$L" --threads "$threads" --json "$out/dsa-$L.json" |
  tee "$out/dsa-$L.txt"
# torch's BLAS: OpenBLAS where it is installed (libopenblas0-openmp, or TORCH_BLAS_DIR), with its
# AVX-512 kernels on a CPU that has them (OpenBLAS 0.3.21 takes Zen 5 for Haswell).
blas=${TORCH_BLAS_DIR:-/usr/lib/x86_64-linux-gnu/openblas-openmp}
if [ -e "$blas/libblas.so.3" ]; then
  export LD_LIBRARY_PATH="$blas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if grep -q avx512f /proc/cpuinfo; then export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-SkylakeX}; fi
fi
# glibc keeps blocks up to 32 MiB in its heap rather than mapping (and faulting in) fresh pages.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-33554432}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1073741824}
/usr/bin/python3 bench/torch_cpu_baseline.py --L "$L" --threads "$threads" \
  --ours "$out/dsa-$L.json" --json "$out/torch-$L.json" | tee "$out/torch-$L.txt"
