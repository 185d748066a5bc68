#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, then every shipped build mode.
#   1. build/          default options (CUDA compiled in when nvcc is present, service on): all
#                      tests; GPU tests (label gpu) skip themselves without a device.
#   2. build-cpu/      PKV_WITH_CUDA=OFF (a machine without nvcc: the CPU-only worker): all tests.
#   3. build-gpu-core/ PKV_WITH_SERVICE=OFF with CUDA (how the GPU machine builds the kernels,
#                      pool, scheduler, engine and benchmarks without gRPC), with the FlashInfer
#                      side-by-side arm (PKV_WITH_FLASHINFER=ON, headers fetched from PyPI by
#                      bench/flashinfer/fetch_headers.sh into .fi): its tests. Skipped when nvcc is absent
#                      (then mode 1 already is a CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${PKV_JOBS:-$(nproc)}"
CMAKE_ARGS=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo)

scripts/setup.sh
(cd build && ctest --output-on-failure -j "$JOBS" --timeout 900)

echo "test: CPU-only build (PKV_WITH_CUDA=OFF)"
cmake -S . -B build-cpu "${CMAKE_ARGS[@]}" -DPKV_WITH_CUDA=OFF
cmake --build build-cpu -j "$JOBS"
(cd build-cpu && ctest --output-on-failure -j "$JOBS" --timeout 900)

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "test: core build with CUDA and the FlashInfer arm, no service (PKV_WITH_SERVICE=OFF)"
  [ -f .fi/VERSIONS ] || bench/flashinfer/fetch_headers.sh
  cmake -S . -B build-gpu-core "${CMAKE_ARGS[@]}" -DPKV_WITH_SERVICE=OFF -DPKV_WITH_FLASHINFER=ON
  cmake --build build-gpu-core -j "$JOBS"
  (cd build-gpu-core && ctest --output-on-failure -j "$JOBS" --timeout 900)
fi
