#!/usr/bin/env bash
# scripts/pack_build_deps.sh [OUT] — packs this Debian machine's Abseil (headers, libraries,
# CMake package files) into OUT [.gpudeps], for building the core (PKV_WITH_SERVICE=OFF: kernels,
# pool, scheduler, engine, pkv-bench, pkv-calibrate, the tests) on a GPU host that has the CUDA
# toolkit and GoogleTest but no Abseil package and no internet. bench/gpu.sh uses .gpudeps when it
# is there (or PKV_DEPS=OUT) together with PKV_CMAKE_ARGS=-DPKV_WITH_SERVICE=OFF. See docs/GPU.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.gpudeps}"
ARCH="$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)"
[[ -d /usr/include/absl ]] || { echo "pack_build_deps: no Abseil here (apt install libabsl-dev)" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$DEST/include" "$DEST/lib/$ARCH/cmake"
cp -r /usr/include/absl "$DEST/include/"
cp -a /usr/lib/"$ARCH"/libabsl_*.so* "$DEST/lib/$ARCH/"
cp -r /usr/lib/"$ARCH"/cmake/absl "$DEST/lib/$ARCH/cmake/"
echo "$DEST: $(du -sh "$DEST" | cut -f1)"
