#!/usr/bin/env bash
# bench/gpu_suite.sh — one call on the GPU machine: configure + build (no gRPC), GPU tests, kernel
# benchmark. Logs and CSVs go to $OUT (default ./gpu-out); a short table is printed last.
#
#   bench/gpu_suite.sh [COMMIT]
# Environment: JOBS (build parallelism, default nproc), BUILD_DIR (default build-gpu, shared with gpu_serving_suite.sh),
#   TESTS=0 (skip tests), BENCH=full|quick|none (default full), G18=0 (skip the G=1 / G=8 runs),
#   PKV_PREBUILT=DIR (a make-gpu-bundle.sh bundle to use when the build fails or is skipped),
#   SKIP_BUILD=1, SANITIZE=1 (compute-sanitizer memcheck + racecheck on the shape sweep),
#   FI=0 (no FlashInfer even when ./.fi is there).
# FlashInfer side by side: when ./.fi holds the headers (bench/fetch_flashinfer.sh, run where
# there is internet) the build adds -DPKV_WITH_FLASHINFER=ON, runs flashinfer_arm_test and the
# kernel tables get fi_decode / fi_prefill columns and ours/FI speed. Carry it:
#   run(command="export OUT; bench/gpu_suite.sh <commit>", carry=[".gpudeps", ".fi"])
# Abseil comes from ./.gpudeps when the machine has none (the GPU image has none): make it here
# with bench/make_gpu_deps.sh and carry it. Example device call:
#   run(command="export OUT; SANITIZE=1 bench/gpu_suite.sh $(git rev-parse --short HEAD)", carry=[".gpudeps"])
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
COMMIT="${1:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
BUILD_DIR="${BUILD_DIR:-build-gpu}"  # shared with gpu_serving_suite.sh: a warm machine reuses it
JOBS="${JOBS:-$(nproc)}"
BENCH="${BENCH:-full}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/build.log"

BIN=""
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  EXTRA=()
  if [[ ! -d /usr/include/absl && -d "$ROOT/.gpudeps" ]]; then
    EXTRA+=("-DCMAKE_PREFIX_PATH=$ROOT/.gpudeps")
    export LD_LIBRARY_PATH="$ROOT/.gpudeps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  FI_TARGETS=()
  if [[ "${FI:-1}" != 0 && -f "$ROOT/.fi/flashinfer/include/flashinfer/attention/decode.cuh" ]]; then
    EXTRA+=("-DPKV_WITH_FLASHINFER=ON" "-DPKV_FLASHINFER_DIR=$ROOT/.fi")
    FI_TARGETS+=(flashinfer_arm_test)
    echo "FlashInfer: headers in .fi ($(cat "$ROOT/.fi/VERSIONS" 2>/dev/null | tr '\n' ' '))" | tee -a "$OUT/build.log"
  fi
  start=$(date +%s)
  if cmake -S . -B "$BUILD_DIR" -G Ninja -DPKV_WITH_SERVICE=OFF -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_CUDA_ARCHITECTURES=90a-real "${EXTRA[@]}" >>"$OUT/build.log" 2>&1 &&
     cmake --build "$BUILD_DIR" -j "$JOBS" --target decode_attention_cuda_test pkv-bench "${FI_TARGETS[@]}" \
        $( [[ -f tests/kvpool_cuda/CMakeLists.txt ]] && echo device_kv_arena_test ) >>"$OUT/build.log" 2>&1; then
    BIN="$BUILD_DIR/bin"
    echo "build: OK in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
  else
    echo "build: FAILED after $(( $(date +%s) - start )) s (tail of log:)" | tee -a "$OUT/build.log"
    tail -20 "$OUT/build.log"
  fi
fi
RUN=()
if [[ -z "$BIN" ]]; then
  if [[ -n "${PKV_PREBUILT:-}" && -d "$PKV_PREBUILT" ]]; then
    echo "using prebuilt bundle $PKV_PREBUILT" | tee -a "$OUT/build.log"
    export LD_LIBRARY_PATH="$ROOT/$PKV_PREBUILT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    BIN="$PKV_PREBUILT/bin"
    chmod u+x "$BIN"/* 2>/dev/null
  else
    echo "no binaries"; exit 1
  fi
fi

if [[ "${TESTS:-1}" == 1 ]]; then
  for t in decode_attention_cuda_test device_kv_arena_test flashinfer_arm_test; do
    [[ -x "$BIN/$t" ]] || continue
    echo "== $t" >>"$OUT/tests.log"
    timeout 400 "$BIN/$t" >>"$OUT/tests.log" 2>&1
    echo "$t: rc=$?" | tee -a "$OUT/tests.log"
  done
  if [[ "${SANITIZE:-0}" == 1 && -x "$BIN/decode_attention_cuda_test" ]] && command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer $tool (ShapesSweep, PageSizes)" >>"$OUT/tests.log"
      timeout 240 compute-sanitizer --tool $tool --print-limit 10 "$BIN/decode_attention_cuda_test" \
          --gtest_filter='*ShapesSweep*:*PageSizes*' 2>&1 | tail -6 >>"$OUT/tests.log"
    done
  fi
fi

case "$BENCH" in
  full) GRID=(); STEPS=3 ;;
  quick) GRID=(--batches=1,8,64 --contexts=2048,32768 --b1-extra=4096,16384); STEPS=1 ;;
  *) GRID=() ;;
esac
if [[ "$BENCH" != none ]]; then
  "$BIN/pkv-bench" kernels "${GRID[@]}" --mixed-steps=$STEPS --commit="$COMMIT" \
      --csv="$OUT/kernels_g4.csv" --md="$OUT/kernels_g4.md" > /dev/null 2>&1
  echo "bench G=4: rc=$?"
  if [[ "${G18:-1}" == 1 ]]; then
    for hq in 8 64; do
      g=$((hq / 8))
      "$BIN/pkv-bench" kernels --dtypes=fp16 --batches=1,8,64 --contexts=2048,32768 --b1-extra=4096,16384 \
          --mixed-steps=1 --hq=$hq --commit="$COMMIT" --csv="$OUT/kernels_g$g.csv" --md="$OUT/kernels_g$g.md" \
          > /dev/null 2>&1
      echo "bench G=$g: rc=$?"
    done
    cat "$OUT/kernels_g1.md" "$OUT/kernels_g8.md" > "$OUT/kernels_g1_g8.md" 2>/dev/null && rm -f "$OUT/kernels_g1.md" "$OUT/kernels_g8.md"
  fi
  echo
  echo "==== key rows (G=4) ===="
  grep -E "^- (GPU|ceilings)" "$OUT/kernels_g4.md"
  grep -E "\| (B1x4096|B1x16384|B1x131072|B8x32768|B16x131072|B64x8192|B64x32768) \|" "$OUT/kernels_g4.md"
  sed -n '/mixed workload/,$p' "$OUT/kernels_g4.md"
  for g in 1 8; do
    [[ -f "$OUT/kernels_g$g.csv" ]] && echo "G=$g best % stream per case:" &&
      awk -F, '$14==1 {printf "  %s %s %.1f%%\n", $1, $2, $12}' "$OUT/kernels_g$g.csv" | head -12
  done
fi
if [[ -f "$OUT/tests.log" ]]; then
  echo "==== tests ===="
  grep -E "^[a-z_]+_test: rc=|^\[  (PASSED|FAILED) |^\[  FAILED  \]|ERROR SUMMARY|^ingest:" "$OUT/tests.log"
fi
