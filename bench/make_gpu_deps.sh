#!/usr/bin/env bash
# bench/make_gpu_deps.sh — packs this (Debian 12) machine's Abseil headers, libraries and CMake
# package files into ./.gpudeps so that bench/gpu_suite.sh can configure and build on the GPU
# machine, whose image has no Abseil (GoogleTest is there). Ignore the folder in git and name it in
# the device call's `carry`:  echo /.gpudeps/ >> .git/info/exclude
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.gpudeps"
ARCH=x86_64-linux-gnu
rm -rf "$DEST"
mkdir -p "$DEST/include" "$DEST/lib/$ARCH/cmake"
cp -r /usr/include/absl "$DEST/include/"
cp -a /usr/lib/$ARCH/libabsl_*.so* "$DEST/lib/$ARCH/"
cp -r /usr/lib/$ARCH/cmake/absl "$DEST/lib/$ARCH/cmake/"
echo ".gpudeps: $(du -sh "$DEST" | cut -f1)"
