#!/usr/bin/env bash
# bench/gpu_serving_suite.sh — one call on the GPU machine for the engine on the CUDA backend:
# configure + build (no gRPC), the engine's GPU test (every route vs the CPU reference through
# the engine), pkv-calibrate (fits the cost-model profile), then `pkv-bench trace` with that
# profile. Logs, the profile and CSV/markdown go to $OUT; a short summary is printed last.
#   bench/gpu_serving_suite.sh [COMMIT]
# Environment: JOBS, BUILD_DIR (default build-gpu, shared with gpu_suite.sh), TRACE=full|quick|none (default full),
#   SEEDS (default the held-out 20260623..27), LAYERS (default 32), FI=0 (no FlashInfer),
#   EXTRAS=0 (skip `pkv-bench ingest` and the eager-vs-graph trace pair that follow the trace),
#   PROFILE_IN=path (use this calibration profile instead of running pkv-calibrate).
# One call may not hold everything within the device's 10-minute limit: e.g. first
#   TRACE=quick (build, tests, calibration, one-seed trace, extras), commit the profile it writes
#   to scheduler/profiles/, then TRACE=full EXTRAS=0 PROFILE_IN=scheduler/profiles/<it>.json.
# With ./.fi (bench/fetch_flashinfer.sh; carry it too) it builds with -DPKV_WITH_FLASHINFER=ON,
# runs flashinfer_arm_test, and the trace gets fi_decode / fi_prefill arms and adaptive/FI ratios.
# Abseil comes from ./.gpudeps (bench/make_gpu_deps.sh) when the machine has none. Device call:
#   run(command="export OUT; bench/gpu_serving_suite.sh <commit>", carry=[".gpudeps"]) — pass the commit
#   hash from here: the tree copied to the GPU machine has no .git.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
COMMIT="${1:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
BUILD_DIR="${BUILD_DIR:-build-gpu}"  # shared with gpu_suite.sh: a warm machine reuses it
JOBS="${JOBS:-$(nproc)}"
TRACE="${TRACE:-full}"
SEEDS="${SEEDS:-20260623,20260624,20260625,20260626,20260627}"
LAYERS="${LAYERS:-32}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/serving-build.log"
EXTRA=()
if [[ ! -d /usr/include/absl && -d "$ROOT/.gpudeps" ]]; then
  EXTRA+=("-DCMAKE_PREFIX_PATH=$ROOT/.gpudeps")
  export LD_LIBRARY_PATH="$ROOT/.gpudeps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
FI_TARGETS=()
if [[ "${FI:-1}" != 0 && -f "$ROOT/.fi/flashinfer/include/flashinfer/attention/decode.cuh" ]]; then
  EXTRA+=("-DPKV_WITH_FLASHINFER=ON" "-DPKV_FLASHINFER_DIR=$ROOT/.fi")
  FI_TARGETS+=(flashinfer_arm_test)
  echo "FlashInfer: headers in .fi" | tee -a "$OUT/serving-build.log"
fi
start=$(date +%s)
if ! { cmake -S . -B "$BUILD_DIR" -G Ninja -DPKV_WITH_SERVICE=OFF -DCMAKE_BUILD_TYPE=Release \
         -DCMAKE_CUDA_ARCHITECTURES=90a-real "${EXTRA[@]}" >>"$OUT/serving-build.log" 2>&1 &&
       cmake --build "$BUILD_DIR" -j "$JOBS" --target engine_cuda_test engine_test pkv-calibrate pkv-bench "${FI_TARGETS[@]}" \
         >>"$OUT/serving-build.log" 2>&1; }; then
  echo "build: FAILED after $(( $(date +%s) - start )) s"; tail -30 "$OUT/serving-build.log"; exit 1
fi
echo "build: OK in $(( $(date +%s) - start )) s"
BIN="$BUILD_DIR/bin"

timeout 300 "$BIN/engine_cuda_test" >"$OUT/engine_cuda_test.log" 2>&1
TEST_RC=$?
timeout 60 "$BIN/engine_test" >>"$OUT/engine_cuda_test.log" 2>&1 || TEST_RC=1
grep -E "^\[  (PASSED|FAILED) |^\[==========\]|Failure|rel" "$OUT/engine_cuda_test.log" | tail -12
if [[ -x "$BIN/flashinfer_arm_test" ]]; then
  timeout 300 "$BIN/flashinfer_arm_test" >"$OUT/flashinfer_arm_test.log" 2>&1
  echo "flashinfer_arm_test: rc=$?"; grep -E "^\[  (PASSED|FAILED) |Failure" "$OUT/flashinfer_arm_test.log" | tail -6
fi

if [[ -n "${PROFILE_IN:-}" ]]; then
  PROFILE="$PROFILE_IN"  # a profile calibrated in an earlier call (committed or carried)
  echo "profile: $PROFILE (PROFILE_IN; no calibration in this call)"
else
  GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | sed 's/nvidia //; s/[^a-z0-9]\+/-/g; s/-$//')
  PROFILE="$OUT/${GPU_TAG:-gpu}-hq32-hkv8-d128-p16-fp16.json"
  timeout 240 "$BIN/pkv-calibrate" --out="$PROFILE" 2>&1 | tee "$OUT/calibrate.log"
  [[ -f "$PROFILE" ]] || PROFILE=""
fi

if [[ "$TRACE" != none ]]; then
  WL="bimodal:8,uniform:8,zipf:8,bimodal:4,bucketed:1"
  ARGS=(--workloads="$WL" --seeds="$SEEDS" --layers="$LAYERS")
  if [[ "$TRACE" == quick ]]; then ARGS=(--workloads="$WL" --seeds=20260623 --layers=8); fi
  [[ -n "$PROFILE" ]] && ARGS+=(--profile="$PROFILE")
  timeout 420 "$BIN/pkv-bench" trace "${ARGS[@]}" --csv="$OUT/trace.csv" --md="$OUT/trace.md" \
    --commit="$COMMIT" 2>"$OUT/trace.err" | tee "$OUT/trace.log"
  tail -5 "$OUT/trace.err"
fi
if [[ "${EXTRAS:-1}" != 0 ]]; then
  # Merged-staged WriteKV ingest against a plain pinned cudaMemcpy of the same bytes.
  timeout 120 "$BIN/pkv-bench" ingest --md="$OUT/ingest.md" --commit="$COMMIT" 2>&1 | tee "$OUT/ingest.log" | tail -8
  # CUDA-graph replay against eager launches on the same workloads (one seed).
  GARGS=(--workloads=bimodal:8,bucketed:1 --seeds=20260623 --layers="$LAYERS")
  [[ -n "$PROFILE" ]] && GARGS+=(--profile="$PROFILE")
  for mode in eager graph; do
    timeout 240 "$BIN/pkv-bench" trace "${GARGS[@]}" --launch-mode=$mode --csv="$OUT/trace-$mode.csv" \
      --md="$OUT/trace-$mode.md" --commit="$COMMIT" 2>"$OUT/trace-$mode.err" | tail -12 | sed "s/^/[$mode] /"
  done
fi
echo "== engine_cuda_test rc=$TEST_RC; profile ${PROFILE:-none}"
