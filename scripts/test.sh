#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, then every shipped build mode.
#   1. build/      default options (CUDA compiled in when nvcc is present, service on): all tests;
#                  GPU tests (label gpu) skip themselves without a device.
#   2. build-core/ PKV_WITH_CUDA=OFF PKV_WITH_SERVICE=OFF (how the GPU machine builds the core
#                  without gRPC): its tests.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${PKV_JOBS:-$(nproc)}"

scripts/setup.sh
(cd build && ctest --output-on-failure -j "$JOBS" --timeout 900)

echo "test: core-only build (no CUDA, no service)"
cmake -S . -B build-core -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPKV_WITH_CUDA=OFF -DPKV_WITH_SERVICE=OFF
cmake --build build-core -j "$JOBS"
(cd build-core && ctest --output-on-failure -j "$JOBS" --timeout 900)
