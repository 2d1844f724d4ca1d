#!/usr/bin/env bash
# Configures and builds dsa in build/ (or $1); further arguments go to CMake's first configure,
# e.g. scripts/build.sh build-asan -DDSA_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] ||
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "${@:2}"
cmake --build "$build" --parallel "$(nproc)"
