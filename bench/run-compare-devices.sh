#!/usr/bin/env bash
# dsa-compare on the CPU and on the GPU over the same generated v32 workload, timed, then both
# reports side by side (bench/NOTES.md, "dsa-compare on the GPU"). Needs a build with DSA_CUDA.
# Usage: bash bench/run-compare-devices.sh [L] [OUT_DIR]     e.g. 4096
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-4096}
out=${2:-out/compare-devices}
bin=build/apps
mkdir -p "$out"
w="$out/v32-$L.safetensors"
"$bin/dsa-gen" --preset v32 --length "$L" --needles 16 --indexer-noise 1.0 --seed 11 \
  --dtype bf16 -q -o "$w"
for device in cpu cuda; do
  start=$(date +%s%N)
  "$bin/dsa-compare" --q "$w:q" --kv "$w:kv" --dv 512 --q-index "$w:q_index" \
    --k-index "$w:k_index" --weights "$w:weights" --needles "$w:needles" --precision fp8 \
    --ue8m0 --hadamard --scale deepseek-v3.2 --sweep-topk 512,2048 --device "$device" \
    -o "$out/$device.json"
  end=$(date +%s%N)
  echo "$device: $(((end - start) / 1000000)) ms wall ($(nproc) host threads)"
done
/usr/bin/python3 bench/compare_devices.py "$out/cpu.json" "$out/cuda.json"
