#!/usr/bin/env bash
# bench/gpu.sh — tests and benchmarks on a GPU host, one suite at a time or all of them.
# Run `bench/gpu.sh --help` for the suites, options and environment variables; docs/GPU.md
# explains the set-up (scripts/setup.sh first) and what each suite records.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
# shellcheck source=bench/lib/common.sh
source "$ROOT/bench/lib/common.sh"

ALL_SUITES=(tests kernels serving scaling e2e breakdown ingest model)
usage() {
  cat <<'EOF'
usage: bench/gpu.sh SUITE... [options]

Builds what a suite needs (Release, in build-bench/) unless --bin is given, runs it, and writes
logs, CSV/markdown tables and JSON reports under OUT/SUITE/; a short summary is printed last.

Suites:
  tests        every GPU test (CTest label gpu): kernels, device pool, engine, FlashInfer arm;
               SANITIZE=1 adds compute-sanitizer memcheck and racecheck on the kernel shape sweep
  kernels      pkv-bench kernels: every route on the G=4 grid (fp16, bf16) and mixed steps, then
               G=1 and G=8; FlashInfer columns when .fi holds its headers
  serving      pkv-calibrate (a cost-model profile for this GPU), pkv-bench trace with it (every
               arm through the engine, held-out seeds), then pkv-bench ingest
  scaling      the adaptive choice at G=1 and G=8 (own profiles) and at B16 / B64
  e2e          pkv-worker over loopback gRPC driven by pkv-replay: steady decode against the engine
               alone (pkv-bench trace, same rows), bimodal B8 with prompts streaming in, 2x4
               micro-batches, Azure and Mooncake traces with arrivals, the static-reservation
               baseline; ratios against kernel-only and steady decode
  breakdown    where a layer-step's time goes, stage by stage (pkv-worker --attention=run|skip)
  ingest       prompt KV ingest: the device arena test, pkv-bench ingest with 1 and 8 writers,
               and pkv-ingest-bench (raw TCP vs engine vs gRPC WriteKV) when it is built
  model        a Llama model (8B-like shape, seeded weights, bf16 on the GPU) decoding with its
               attention in the worker, from Python: tokens/s, time between tokens, the share of
               each token step in the worker vs the model's layers, tokens vs the model's generate
  overhead     host and RPC cost of a layer-step on the CPU backend (no GPU needed)
  experiments  tuning: cp.async pipeline depth 4 vs 3, and an Nsight Compute profile (needs ncu)
  all          tests kernels serving scaling e2e breakdown ingest model, in that order

Options:
  --out DIR       output folder [gpu-out, or $OUT]
  --bin DIR       use prebuilt binaries instead of building: a folder of binaries, or a bundle
                  made by scripts/make_bundle.sh (docs/GPU.md, hosts without gRPC or a compiler)
  --build-dir DIR where to build [build-bench]
  --jobs N        build parallelism [number of cores]
  --commit HASH   commit stamped into the results [git rev-parse --short HEAD]
  --quick         shorter runs: reduced kernel grid, one-seed 8-layer traces, fewer requests
  --smoke         e2e, breakdown and model only: check the scripts on the CPU backend with a tiny model
                  (no GPU needed; implies --quick)
  --no-flashinfer build without the FlashInfer arm even when .fi holds its headers
  -h, --help      this text

Environment (defaults in brackets):
  build      PKV_CMAKE_ARGS (extra CMake arguments), PKV_DEPS (a prefix with libraries the host
             lacks, e.g. Abseil from scripts/pack_build_deps.sh)
  tests      SANITIZE=1; GPU_TESTS (with --bin: which test binaries to run
             [decode_attention_cuda_test device_kv_arena_test engine_cuda_test flashinfer_arm_test])
  kernels    BENCH=full|quick|none [full]; G18=0 skips G=1 / G=8; PROFILE (the planned column's
             cost-model profile at G=4) [the shipped profile of the GPU: H200, else H100]
  serving    TRACE=full|quick|none [full]; SEEDS [20260623..27]; LAYERS [32]; EXTRAS=0 skips
             ingest; PROFILE_IN=path uses that profile instead of calibrating
  e2e        RUNS="kernel_only steady_b8 steady_b4x2 steady_b2x4 bimodal_b8 bimodal_b4x2 azure_conv
             azure_conv_static mooncake_conv" (a subset runs only those) [all];
             PROFILE [the shipped profile of the GPU: H200, else H100]; WORKER_ARGS,
             REPLAY_ARGS (extra pkv-worker / pkv-replay flags); TRANSPORT=tcp|unix|shm [tcp]
  breakdown  BACKEND, CONTEXT, STEPS, WARMUP, BATCHES, MICRO, MODEL, CPU_THREADS,
             SERVICE_THREADS, CHECK, WORKER_ARGS, REPLAY_ARGS, LABEL, TRANSPORT=tcp|unix|shm
             (see bench/suites/breakdown.sh)
  ingest     INGEST_THREADS [4], COPY_THREADS [4]
  model      PKV_PYTHON, BATCH, MICRO, PROMPT, STEPS, MODEL_ARGS (see bench/suites/model.sh)
  overhead   REPLAY_ARGS (extra pkv-replay flags)

Examples:
  scripts/setup.sh && bench/gpu.sh all
  bench/gpu.sh kernels --quick --out /tmp/h200
  bench/gpu.sh e2e --smoke                      # on a machine without a GPU
  RUNS="azure_conv azure_conv_static" bench/gpu.sh e2e
EOF
}

SUITES=()
OUT="${OUT:-$ROOT/gpu-out}"
COMMIT=""
QUICK="${QUICK:-0}"
SMOKE="${SMOKE:-0}"
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#*=}" ;;
    --bin) PKV_BIN="$2"; shift ;;
    --bin=*) PKV_BIN="${1#*=}" ;;
    --build-dir) PKV_BUILD_DIR="$2"; shift ;;
    --build-dir=*) PKV_BUILD_DIR="${1#*=}" ;;
    --jobs) PKV_JOBS="$2"; shift ;;
    --jobs=*) PKV_JOBS="${1#*=}" ;;
    --commit) COMMIT="$2"; shift ;;
    --commit=*) COMMIT="${1#*=}" ;;
    --quick) QUICK=1 ;;
    --smoke) SMOKE=1; QUICK=1 ;;
    --no-flashinfer) FI=0 ;;
    all) SUITES+=("${ALL_SUITES[@]}") ;;
    -*) echo "bench/gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      if [[ ! -f "$ROOT/bench/suites/$1.sh" ]]; then
        echo "bench/gpu.sh: unknown suite $1 (see --help)" >&2; exit 2
      fi
      SUITES+=("$1") ;;
  esac
  shift
done
if ((${#SUITES[@]} == 0)); then usage >&2; exit 2; fi
export PKV_BIN PKV_BUILD_DIR PKV_JOBS FI
[[ -n "$COMMIT" ]] || COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
if [[ -n "${PKV_BIN:-}" ]]; then PKV_BIN="$(cd "$PKV_BIN" && pwd)" || exit 2; fi

RESULTS=()
FAILED=0
for SUITE in "${SUITES[@]}"; do
  SUITE_OUT="$OUT/$SUITE"
  mkdir -p "$SUITE_OUT"
  pkv_section "$SUITE (output in $SUITE_OUT)"
  start=$(date +%s)
  # Each suite runs in a subshell: its variables, traps and `exit` stay its own.
  (
    # shellcheck source=/dev/null
    source "$ROOT/bench/suites/$SUITE.sh"
    "suite_$SUITE"
  )
  rc=$?
  ((rc == 0)) || FAILED=1
  RESULTS+=("$(printf '%-12s rc=%-3s %5d s  %s' "$SUITE" "$rc" $(($(date +%s) - start)) "$SUITE_OUT")")
done
pkv_section "suites (commit $COMMIT)"
printf '%s\n' "${RESULTS[@]}"
exit $FAILED
