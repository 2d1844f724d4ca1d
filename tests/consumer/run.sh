#!/usr/bin/env bash
# The installed package, as another project sees it (ctest -L install): installs the build tree
# into a fresh prefix, builds this directory's consumer against it with find_package(dsa), and
# main.cpp once more by hand with `pkg-config --cflags --libs dsa`; runs both.
# usage: run.sh CMAKE BUILD_DIR LIBDIR CXX GENERATOR
set -euo pipefail
cmake=$1 build=$2 libdir=$3 cxx=$4 generator=$5
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/dsa-consumer.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

"$cmake" --install "$build" --prefix "$prefix" >"$work/install.log" ||
  { cat "$work/install.log"; exit 1; }

echo "== find_package(dsa) against $prefix"
"$cmake" -S "$here" -B "$work/cmake-build" -G "$generator" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" >"$work/configure.log" ||
  { cat "$work/configure.log"; exit 1; }
found=$(sed -n 's/^dsa_DIR:PATH=//p' "$work/cmake-build/CMakeCache.txt")
[ "$found" = "$prefix/$libdir/cmake/dsa" ] ||
  { echo "found the package in '$found', not in $prefix/$libdir/cmake/dsa" >&2; exit 1; }
"$cmake" --build "$work/cmake-build"
"$work/cmake-build/consumer"

echo "== pkg-config dsa against $prefix"
export PKG_CONFIG_PATH=$prefix/$libdir/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
[ "$(pkg-config --variable=prefix dsa)" = "$prefix" ] ||
  { echo "pkg-config found dsa.pc with prefix '$(pkg-config --variable=prefix dsa)'" >&2; exit 1; }
flags=$(pkg-config --cflags --libs dsa)
echo "pkg-config --cflags --libs dsa: $flags"
# shellcheck disable=SC2086  # the flags are words
"$cxx" -std=c++17 -DDSA_EXPECTED_VERSION="\"$(pkg-config --modversion dsa)\"" \
  "$here/main.cpp" -o "$work/consumer-pc" $flags
"$work/consumer-pc"
