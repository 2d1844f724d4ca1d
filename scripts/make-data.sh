#!/usr/bin/env bash
# Regenerates data/workload.safetensors (the main job's input) with the toolkit's own dsa-gen:
# the small preset at L = 2048, 32 needles, and an indexer of middling quality (noise 1.5).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build}/apps
"$bin/dsa-gen" --preset small --length 2048 --needles 32 --indexer-noise 1.5 --seed 7 \
  --dtype bf16 -o data/workload.safetensors -q
