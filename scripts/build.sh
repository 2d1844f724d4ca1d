#!/usr/bin/env bash
# Configures and builds dsa in build/ (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] || cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" --parallel "$(nproc)"
