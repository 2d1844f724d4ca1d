#!/usr/bin/env bash
# Unpacks the Debian header packages the build needs into .deps/ (git-ignored), for a machine
# with no package registry (the GPU machine): carry .deps and configure with
#   cmake -S . -B build -DCMAKE_PREFIX_PATH=$PWD/.deps/usr
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(libeigen3-dev libfmt-dev libfmt9 nlohmann-json3-dev libcli11-dev libgtest-dev googletest)
mkdir -p .deps/debs
if [ ! -f .deps/.done ]; then
  (cd .deps/debs && apt-get download "${packages[@]}" >/dev/null)
  for deb in .deps/debs/*.deb; do dpkg -x "$deb" .deps; done
  rm -rf .deps/debs .deps/usr/share/doc .deps/usr/share/man
  touch .deps/.done
fi
du -sh .deps
