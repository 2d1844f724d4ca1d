#!/usr/bin/env bash
# Installs what the CPU benchmark's PyTorch peer needs (bench/torch_cpu_baseline.py): Debian's
# python3-torch. Not part of CI's path (.ci/run); run as root. Idempotent.
set -euo pipefail

if dpkg-query -W -f='${Status}' python3-torch 2>/dev/null | grep -q "install ok installed"; then
  echo "install-bench-deps: python3-torch is installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-bench-deps: missing python3-torch; run as root (apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3-torch >/dev/null
