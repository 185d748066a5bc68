#!/usr/bin/env bash
# bench/gpu_experiments.sh — tuning experiments on the GPU machine, run after gpu_suite.sh built
# $BUILD_DIR: (1) the cp.async pipeline depth (PKV_KV_STAGES=4 vs the default 3) on a subset of
# the kernel benchmark; (2) an Nsight Compute profile of the work-queue kernel on a latency-bound
# case. Outputs under $OUT; a short comparison printed last.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
BUILD_DIR="${BUILD_DIR:-build-gpu-suite}"
EXTRA=()
if [[ ! -d /usr/include/absl && -d "$ROOT/.gpudeps" ]]; then
  EXTRA+=("-DCMAKE_PREFIX_PATH=$ROOT/.gpudeps")
  export LD_LIBRARY_PATH="$ROOT/.gpudeps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
SUBSET=(--dtypes=fp16 --batches=1,4,8,64 --contexts=2048,8192,32768 --b1-extra=4096,16384 --mixed-steps=2)
if cmake -S . -B build-s4 -G Ninja -DPKV_WITH_SERVICE=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a-real \
      "-DCMAKE_CUDA_FLAGS=-DPKV_KV_STAGES=4" "${EXTRA[@]}" > "$OUT/exp_build.log" 2>&1 &&
   cmake --build build-s4 -j "$(nproc)" --target pkv-bench >> "$OUT/exp_build.log" 2>&1; then
  "$BUILD_DIR/bin/pkv-bench" kernels "${SUBSET[@]}" --md="$OUT/exp_s3.md" > /dev/null 2>&1
  build-s4/bin/pkv-bench kernels "${SUBSET[@]}" --md="$OUT/exp_s4.md" > /dev/null 2>&1
  echo "stages 3 vs 4 (best us, % stream):"
  paste -d'|' <(grep '^| fp16' "$OUT/exp_s3.md" | awk -F'|' '{printf "%-16s %8s %6s", $3, $9, $11}') \
              <(grep '^| fp16' "$OUT/exp_s4.md" | awk -F'|' '{printf " %8s %6s", $9, $11}')
else
  echo "stage-4 build failed"; tail -5 "$OUT/exp_build.log"
fi
if command -v ncu > /dev/null; then
  timeout 240 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      -k regex:WorkQueueKernel -c 2 "$BUILD_DIR/bin/pkv-bench" kernels --dtypes=fp16 --batches=8 --contexts=2048 \
      --b1-extra= --mixed=0 --runs=1 --warmup=0 > "$OUT/ncu_wq_b8x2048.txt" 2>&1
  echo "ncu rc=$?"
  grep -E "DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Grid Size" \
      "$OUT/ncu_wq_b8x2048.txt" | head -40
fi
