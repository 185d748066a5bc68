#!/usr/bin/env bash
# bench/gpu_ingest.sh — prompt KV ingest on a GPU host, in one call:
#   1. builds the core (no gRPC) pkv-bench and device_kv_arena_test, runs the test (staged
#      ingest from one and from several threads against host writes), then `pkv-bench ingest`
#      with one writer thread and with eight: the engine's staged path next to a pinned
#      cudaMemcpy of the same bytes;
#   2. when BUNDLE holds pkv-ingest-bench (a binary built with CUDA and the service, packed by
#      make-gpu-bundle.sh), runs it on the CUDA backend for 1 and 8 streams: raw loopback TCP,
#      the engine alone and WriteKV over loopback gRPC, same bytes, same run.
# Results (markdown and logs) go to $OUT.
#   bench/gpu_ingest.sh [BUNDLE] [COMMIT]
# Environment: JOBS, BUILD_DIR (default build-gpu), INGEST_THREADS (worker ingest executor
#   threads for step 2, default 8).
# Abseil comes from ./.gpudeps (bench/make_gpu_deps.sh) when the machine has none.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
BUNDLE="${1:-.gpubundle}"
COMMIT="${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
BUILD_DIR="${BUILD_DIR:-build-gpu}"
JOBS="${JOBS:-$(nproc)}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/ingest-build.log"
EXTRA=()
if [[ ! -d /usr/include/absl && -d "$ROOT/.gpudeps" ]]; then
  EXTRA+=("-DCMAKE_PREFIX_PATH=$ROOT/.gpudeps")
  export LD_LIBRARY_PATH="$ROOT/.gpudeps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ! { cmake -S . -B "$BUILD_DIR" -G Ninja -DPKV_WITH_SERVICE=OFF -DCMAKE_BUILD_TYPE=Release \
         -DCMAKE_CUDA_ARCHITECTURES=90a-real "${EXTRA[@]}" >>"$OUT/ingest-build.log" 2>&1 &&
       cmake --build "$BUILD_DIR" -j "$JOBS" --target pkv-bench device_kv_arena_test >>"$OUT/ingest-build.log" 2>&1; }; then
  echo "build: FAILED"; tail -30 "$OUT/ingest-build.log"; exit 1
fi
BIN="$BUILD_DIR/bin"
timeout 120 "$BIN/device_kv_arena_test" >"$OUT/device_kv_arena_test.log" 2>&1
echo "device_kv_arena_test rc=$?"; grep -E "^\[  (PASSED|FAILED) |Failure|staged ingest" "$OUT/device_kv_arena_test.log"
for w in 1 8; do
  timeout 180 "$BIN/pkv-bench" ingest --writers=$w --md="$OUT/ingest.md" --commit="$COMMIT" 2>&1 |
    tee "$OUT/ingest-writers$w.log" | tail -3
done

if [[ -x "$BUNDLE/bin/pkv-ingest-bench" ]]; then
  timeout 300 "$BUNDLE/run" pkv-ingest-bench --backend=cuda --streams=1,8 --prompt_tokens=4096 --layers=32 \
    --ingest_threads="${INGEST_THREADS:-8}" --label="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) cores" \
    --md="$OUT/ingest.md" --commit="$COMMIT" 2>"$OUT/ingest-rpc.err" | tee "$OUT/ingest-rpc.log"
  tail -3 "$OUT/ingest-rpc.err"
else
  echo "no $BUNDLE/bin/pkv-ingest-bench: the gRPC arm is skipped"
fi
