#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with -fsanitize=fuzzer,address,undefined) in
# build-fuzz/ and runs each for SECONDS (default 60) from a seed corpus of small valid files,
# JOBS targets at a time (default 2). Needs `bash scripts/install-deps.sh --fuzz`.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Logs: build-fuzz/logs/TARGET.log; the corpus grows in build-fuzz/corpus/TARGET; a crashing
# input lands in build-fuzz/artifacts/TARGET/ (make it a regression test in tests/data/regress/).
# Exits 1 when any target found something.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_npy fuzz_safetensors fuzz_jsonl fuzz_config)
jobs=${JOBS:-2}
build=build-fuzz

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] ||
  CXX=clang++-14 cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DDSA_CUDA=OFF -DDSA_FUZZ=ON -DDSA_BUILD_TESTS=OFF
cmake --build "$build" --parallel "$(nproc)" --target make_seeds "${targets[@]}"

seeds=$build/seeds
rm -rf "$seeds" && "$build/fuzz/make_seeds" "$seeds"
mkdir -p "$build/logs"
run_one() {
  local target=$1 kind=${1#fuzz_}
  mkdir -p "$build/corpus/$target" "$build/artifacts/$target"
  # detect_leaks=0: a reader that throws mid-parse owns nothing, and LeakSanitizer's stop-the-
  # world scan per input would halve the executions for no finding.
  ASAN_OPTIONS=detect_leaks=0 "$build/fuzz/$target" -max_total_time="$seconds" \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$build/artifacts/$target/" \
    "$build/corpus/$target" "$seeds/$kind" >"$build/logs/$target.log" 2>&1
}
# One target per background job, JOBS at a time; each job's exit status in logs/TARGET.status.
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
  (run_one "$target" && echo 0 || echo $?) >"$build/logs/$target.status" &
done
wait

found=0
for target in "${targets[@]}"; do
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$build/logs/$target.log" | tail -1 || true)
  execs=$(grep -E '^stat::number_of_executed_units' "$build/logs/$target.log" | awk '{print $2}')
  status=$(cat "$build/logs/$target.status")
  if [ "$status" -eq 0 ]; then
    echo "fuzz: $target: ${execs:-?} executions in ${seconds} s, no finding (${done_line})"
  else
    found=1
    echo "fuzz: $target: FOUND something (exit $status): see $build/logs/$target.log" \
      "and $build/artifacts/$target/" >&2
  fi
done
exit $found
