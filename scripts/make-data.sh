#!/usr/bin/env bash
# Regenerates the shipped workloads with the toolkit's own dsa-gen:
# - data/workload.safetensors (the main job's input): the small preset at L = 2048, 32 needles,
#   and an indexer of middling quality (noise 1.5).
# - data/fit.safetensors (dsa-fit's input, docs/FIT_NOTES.md): L = 4096, so k = 2048 leaves
#   something to select, 4 indexer heads, and hidden states of width 192 with the projections
#   that produce its (noise-free) indexer.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build}/apps
"$bin/dsa-gen" --preset small --length 2048 --needles 32 --indexer-noise 1.5 --seed 7 \
  --dtype bf16 -o data/workload.safetensors -q
# Without the indexer's q_index, k_index and weights, which its projections of the hidden states
# give exactly (dsa-score --hidden), so the file stays under 5 MiB.
"$bin/dsa-gen" --preset small --length 4096 --indexer-heads 4 --needles 32 --hidden 192 --seed 8 \
  --dtype bf16 -o data/fit.safetensors -q \
  --only q,kv,needles,hidden,wq_b.weight,wk.weight,k_norm.weight,k_norm.bias,weights_proj.weight
