#!/usr/bin/env bash
# bench/gpu_scaling_suite.sh — the adaptive machinery beyond the headline shape: G = 1 (Hq 8) and
# G = 8 (Hq 64), each with its own pkv-calibrate profile, and larger batches (B16, B64) at G = 4.
# Shorter than gpu_serving_suite.sh (8 layers per token step, 2 held-out seeds) to fit one call.
#   bench/gpu_scaling_suite.sh <commit>   (carry .gpudeps; output under $OUT)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
COMMIT="${1:-unknown}"
BUILD_DIR="${BUILD_DIR:-build-gpu-serving}"
EXTRA=()
if [[ ! -d /usr/include/absl && -d "$ROOT/.gpudeps" ]]; then
  EXTRA+=("-DCMAKE_PREFIX_PATH=$ROOT/.gpudeps")
  export LD_LIBRARY_PATH="$ROOT/.gpudeps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name --format=csv,noheader
cmake -S . -B "$BUILD_DIR" -G Ninja -DPKV_WITH_SERVICE=OFF -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES=90a-real "${EXTRA[@]}" >"$OUT/scaling-build.log" 2>&1 &&
  cmake --build "$BUILD_DIR" -j "$(nproc)" --target pkv-calibrate pkv-bench >>"$OUT/scaling-build.log" 2>&1 ||
  { tail -20 "$OUT/scaling-build.log"; exit 1; }
BIN="$BUILD_DIR/bin"
SEEDS=20260623,20260624
for HQ in 8 64; do
  P="$OUT/h100-hq$HQ-hkv8-d128-p16-fp16.json"
  timeout 120 "$BIN/pkv-calibrate" --hq=$HQ --samples=8 --out="$P" >"$OUT/calibrate-hq$HQ.log" 2>&1
  grep -E "mean \|error\||wrote" "$OUT/calibrate-hq$HQ.log"
  timeout 150 "$BIN/pkv-bench" trace --hq=$HQ --layers=8 --seeds=$SEEDS --workloads=bimodal:8,zipf:8,bucketed:1 \
    --profile="$P" --commit="$COMMIT" --md="$OUT/trace-hq$HQ.md" --csv="$OUT/trace-hq$HQ.csv" 2>&1 |
    tee "$OUT/trace-hq$HQ.log" | grep -E "adaptive|ceiling"
done
timeout 150 "$BIN/pkv-bench" trace --layers=8 --seeds=$SEEDS --workloads=uniform:16,bimodal:16,uniform:64 \
  --profile=scheduler/profiles/h100-hq32-hkv8-d128-p16-fp16.json --commit="$COMMIT" \
  --md="$OUT/trace-large-b.md" --csv="$OUT/trace-large-b.csv" 2>&1 | tee "$OUT/trace-large-b.log" | grep -E "adaptive|ceiling"
