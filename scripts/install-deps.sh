#!/usr/bin/env bash
# Installs what dsa builds and tests with, from Debian's packages. Idempotent; run as root.
# --fuzz also installs what scripts/fuzz.sh needs: clang with its libFuzzer and OpenMP.
# --bench also installs the CPU benchmark's PyTorch peer (bench/torch_cpu_baseline.py): Debian's
# python3-torch, and OpenBLAS for its matrix products (without it torch uses the reference BLAS,
# about 1 GFLOP/s; bench/run-cpu-bench.sh points torch at OpenBLAS's OpenMP build). Neither is
# on CI's path (.ci/run).
set -euo pipefail

packages=(
  g++ cmake ninja-build pkg-config
  libcli11-dev libfmt-dev libeigen3-dev nlohmann-json3-dev libgtest-dev
  python3-numpy  # the independent NumPy cross-check test
  python3-jsonschema  # the dsa-compare report schema test
  pybind11-dev python3-dev  # the Python module (python/; built when found)
  libopenmpi-dev openmpi-bin  # the tools as MPI ranks (DSA_MPI; built when found)
)
for option in "$@"; do
  case "$option" in
    --fuzz) packages+=(clang-14 libclang-rt-14-dev libomp-14-dev) ;;
    --bench) packages+=(python3-torch libopenblas0-openmp) ;;
    *) echo "install-deps: unknown option $option (--fuzz, --bench)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: everything is installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${missing[*]}; run as root (apt-get)" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
