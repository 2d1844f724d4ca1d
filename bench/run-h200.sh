#!/usr/bin/env bash
# Every GPU figure of bench/NOTES.md's issue-16 sections in one go on the device machine, the
# most important first (a run cut short keeps what it finished): the build, the CUDA tests
# (compute-sanitizer on the newest kernels' tests), the kernel bench at 32K and 128K, the tools
# file to file at L = 131072, cuDNN dense attention over the L sweep, the bench over the sweep,
# and one sequence of 1M tokens. Logs go to OUT (default out/h200).
# Usage: bash bench/run-h200.sh [OUT]   (after bash scripts/device-deps.sh, carrying .deps)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/h200}
mkdir -p "$out"
step() {  # name, command...: runs it, its output in OUT/name.log, and says how it went
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - start)) s"
}
step configure cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PWD/.deps/usr" -DDSA_CUDA=ON -DDSA_PYTHON=OFF
step build cmake --build build -j16 --target test_cuda test_cuda_topk dsa-cuda-bench dsa-gen \
  dsa-select dsa-attend dsa-compare
step test_cuda ./build/tests/test_cuda
step test_cuda_topk ./build/tests/test_cuda_topk
step sanitizer_topk compute-sanitizer --tool memcheck --error-exitcode 9 \
  ./build/tests/test_cuda_topk
step bench ./build/bench/dsa-cuda-bench 32768 131072
step tools bash bench/run-gpu-tools.sh 131072 2048 out/gpu-tools
mkdir -p "$out/tools" && cp out/gpu-tools/*.json "$out/tools/"  # not the GBs of tensors
step torch_dense python3 bench/torch_baselines.py 4096 8192 16384 32768 65536 131072 \
  --no-ceilings --dense-only
step bench_sweep ./build/bench/dsa-cuda-bench 4096 8192 16384 65536
step bench_1m ./build/bench/dsa-cuda-bench 1048576
