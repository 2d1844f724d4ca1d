#!/usr/bin/env bash
# The tools with --device cuda on a v32 workload of L keys, file to file: the last Q query rows
# (decode and chunked prefill's shape; all L rows of 128 x 576 bf16 queries would be 19 GB at
# L = 131072), then dsa-select, dsa-attend and dsa-compare, each run's wall time and the peak
# GPU and host memory its report gives
# (bench/NOTES.md, issue 16). Needs a build with DSA_CUDA.
# Usage: bash bench/run-gpu-tools.sh [L] [Q] [OUT_DIR]     e.g. 131072 2048
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-131072}
Q=${2:-2048}
out=${3:-out/gpu-tools}
bin=build/apps
mkdir -p "$out"
w="$out/v32-$L.safetensors"
indexer=(--q-index "$w:q_index" --k-index "$w:k_index" --weights "$w:weights" --precision fp8
  --ue8m0 --hadamard)
attention=(--q "$w:q" --kv "$w:kv" --dv 512 --scale deepseek-v3.2)
run() {  # name, then the command; its report goes to $out/name.json (dsa-compare's: its -o)
  local name=$1
  shift
  local start end report=(--report "$out/$name.json")
  [[ $name == compare ]] && report=()
  start=$(date +%s%N)
  "$@" "${report[@]}" -q
  end=$(date +%s%N)
  /usr/bin/env python3 - "$out/$name.json" "$name" "$(((end - start) / 1000000))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"run": sys.argv[2], "wall_ms": int(sys.argv[3]), "device": r.get("device"),
                  "peak_device_bytes": r.get("peak_device_bytes"),
                  "peak_rss_bytes": r.get("peak_rss_bytes"), "timings_ms": r.get("timings_ms")}))
PY
}
run gen "$bin/dsa-gen" --preset v32 --length "$L" --queries "$Q" --needles 16 --indexer-noise 1.0 \
  --seed 11 --dtype bf16 -o "$w"
run select "$bin/dsa-select" "${indexer[@]}" -k 2048 --device cuda -o "$out/sel.npy"
run attend "$bin/dsa-attend" "${attention[@]}" --indices "$out/sel.npy" --device cuda \
  -o "$out/attend.npy"
run compare "$bin/dsa-compare" "${attention[@]}" "${indexer[@]}" --needles "$w:needles" \
  --sweep-topk 512,2048 --device cuda -o "$out/compare.json"
/usr/bin/env python3 - "$out/compare.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for e in r["results"]:
    print(json.dumps({"topk": e["topk"], "mass_recall": e["mass_recall"]["sparse"]["mean"],
                      "out_rel_err_global": e["out_rel_err_global"]["sparse"],
                      "needles": [e["needle_recall"]["selected"], e["needle_recall"]["needles"]]}))
PY
