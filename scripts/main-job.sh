#!/usr/bin/env bash
# The main job on what data/ ships: what DSA loses against dense attention on the sample
# workload (fp8 indexer with Hadamard rotation, k from 64 to 512), as dsa-compare's report.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build}/apps
w=data/workload.safetensors
out=${DSA_OUT:-out}
mkdir -p "$out"
"$bin/dsa-compare" --q "$w:q" --kv "$w:kv" --dv 48 \
  --q-index "$w:q_index" --k-index "$w:k_index" --weights "$w:weights" --precision fp8 --hadamard \
  --needles "$w:needles" --sweep-topk 64,128,256,512 -o "$out/compare.json"
cat "$out/compare.json"
echo "report written to $out/compare.json (schema dsa-compare/3, see man/dsa-compare.1)" >&2
