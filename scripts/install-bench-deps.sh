#!/usr/bin/env bash
# Installs what the CPU benchmark's PyTorch peer needs (bench/torch_cpu_baseline.py): Debian's
# python3-torch, and OpenBLAS for its matrix products (without it torch uses the reference BLAS,
# about 1 GFLOP/s). bench/run-cpu-bench.sh points torch at OpenBLAS's OpenMP build. Not part of
# CI's path (.ci/run). Idempotent; run as root.
set -euo pipefail

packages=(python3-torch libopenblas0-openmp)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-bench-deps: everything is installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-bench-deps: missing ${missing[*]}; run as root (apt-get)" >&2
  exit 1
fi
echo "install-bench-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
