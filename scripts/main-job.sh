#!/usr/bin/env bash
# The main job on what data/ ships: the DSA pipeline (fp8 indexer with Hadamard rotation,
# top-128 selection, sparse MQA attention) and the dense baseline, with their reports.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build}/apps
data=data/sample.safetensors
out=${DSA_OUT:-out}
mkdir -p "$out"

"$bin/dsa-select" --q-index "$data:q_index" --k-index "$data:k_index" --weights "$data:weights" \
  --precision fp8 --ue8m0 --hadamard --topk 128 -o "$out/selected.npy" --report "$out/select.json"
"$bin/dsa-attend" --q "$data:q" --kv "$data:kv" --dv 512 --indices "$out/selected.npy" \
  -o "$out/sparse.npy" --lse "$out/sparse_lse.npy" --report "$out/attend-sparse.json"
"$bin/dsa-attend" --q "$data:q" --kv "$data:kv" --dv 512 --dense \
  -o "$out/dense.npy" --report "$out/attend-dense.json"
for report in select attend-sparse attend-dense; do
  echo "== $report"
  cat "$out/$report.json"
done
echo "outputs in $out/: selected.npy sparse.npy sparse_lse.npy dense.npy"
