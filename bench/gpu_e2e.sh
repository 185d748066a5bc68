#!/usr/bin/env bash
# bench/gpu_e2e.sh — issue #5's end-to-end measurements of the gRPC worker on the GPU, in one call.
# pkv-worker (CUDA backend, the calibrated H100 profile) and pkv-replay come from a bundle made
# here:  cmake --build build --target pkv-worker pkv-replay &&
#        ../shared/tools/make-gpu-bundle.sh .gpubundle build/bin/pkv-worker build/bin/pkv-replay
# Device call:  run(command="export OUT; bench/gpu_e2e.sh .gpubundle <commit>", carry=[".gpubundle"])
#
# Runs, over loopback, 32 layers, Hq 32, Hkv 8, d 128, page 16, fp16 (outputs sampled and checked
# against the replay's own double-precision reference in every run):
#   bimodal_b8        B8 bimodal (seed 20260623, 24 requests, full lengths): tokens/s to compare
#                     with `pkv-bench trace` (bench/gpu_serving_suite.sh) on the same workload
#   bimodal_b4x2      the same rows as two interleaved micro-batches of 4
#   bimodal_b8_graph  B8 bimodal with --launch_mode=graph (only when the worker has that flag)
#   azure_conv        Azure conversation slice with its arrival times (bursts): time between
#                     tokens, worst 1 s window, reserved vs used KV
#   azure_conv_static the same against a second worker in the static-reservation baseline mode
#                     (--static_slot_tokens=8192: max context reserved per sequence)
#   mooncake_conv     Mooncake conversation slice with its arrival times (prompts scaled 1/4)
# Everything lands in $OUT/e2e.tgz (logs, JSON reports, worker metrics); a table is printed last.
# RUNS="name ..." runs only those (one device call may not hold all six within its 10 minutes:
# e.g. RUNS="bimodal_b8 bimodal_b4x2 bimodal_b8_graph", then the three trace runs). QUICK=1
# shortens every run. SMOKE=1 checks the script itself on a machine without a GPU: CPU
# backend, 2 layers, prompts scaled to 1/64, binaries from build/bin (implies QUICK=1).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
B="${1:-.gpubundle}"
COMMIT="${2:-unknown}"
QUICK="${QUICK:-0}"
SMOKE="${SMOKE:-0}"
WORK="$(mktemp -d)"
BACKEND=cuda
SCALE=()
if [ "$SMOKE" = 1 ]; then
  QUICK=1; BACKEND=cpu; SCALE=(--context_scale=0.015625 --max_output=8)
  B="$WORK/bundle"; mkdir -p "$B"
  printf '#!/usr/bin/env bash\nname="$1"; shift; exec "%s/build/bin/$name" "$@"\n' "$ROOT" >"$B/run"
fi
chmod +x "$B/run" "$B"/bin/* 2>/dev/null
PROFILE="${PROFILE:-scheduler/profiles/h100-hq32-hkv8-d128-p16-fp16.json}"  # PROFILE=path: another GPU's profile
MODEL=(--num_layers=32 --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --dtype=fp16)
if [ "$SMOKE" = 1 ]; then MODEL=(--num_layers=2 --num_q_heads=8 --num_kv_heads=2 --head_dim=64 --page_size=16 --dtype=fp16); PROFILE=""; fi
{ nvidia-smi 2>/dev/null --query-gpu=name,memory.total,driver_version --format=csv; echo "commit $COMMIT"; } | tee "$WORK/e2e.log"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap cleanup EXIT

# start_worker NAME ARGS... : starts a worker, waits for its ports; sets PORT and MPORT.
start_worker() {
  local name="$1"; shift
  "$B/run" pkv-worker --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --backend=$BACKEND "${MODEL[@]}" \
    --max_message_bytes=268435456 --scatter_seed=20260622 ${PROFILE:+--calibration_profile="$PROFILE"} "$@" \
    >"$WORK/worker-$name.log" 2>&1 &
  PIDS+=($!)
  PORT=""
  for _ in $(seq 1 600); do
    PORT=$(sed -n 's/.*pkv-worker listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/worker-$name.log" | head -n1)
    [ -n "$PORT" ] && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  MPORT=$(sed -n 's/.*pkv-worker metrics on port \([0-9]*\).*/\1/p' "$WORK/worker-$name.log" | head -n1)
  if [ -z "$PORT" ]; then tail -20 "$WORK/worker-$name.log"; echo "worker $name did not start"; return 1; fi
  echo "worker $name on $PORT (metrics $MPORT): $*" | tee -a "$WORK/e2e.log"
}

# run_replay NAME PORT LIMIT_S ARGS...
run_replay() {
  local name="$1" port="$2" limit="$3"; shift 3
  echo "== $name: pkv-replay $*" | tee -a "$WORK/e2e.log"
  timeout "$limit" "$B/run" pkv-replay --target=127.0.0.1:"$port" --progress_s=15 --report_json="$WORK/$name.json" "$@" "${SCALE[@]}" \
    >"$WORK/replay-$name.log" 2>&1
  echo "rc $?" >>"$WORK/replay-$name.log"
  tail -n 16 "$WORK/replay-$name.log" | tee -a "$WORK/e2e.log"
}

scrape() {
  python3 - "$1" >"$WORK/metrics-$2.txt" 2>&1 <<'PY'
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())
PY
}

# want NAME: NAME is among $RUNS (all when RUNS is empty).
want() { [ -z "${RUNS:-}" ] || [[ " $RUNS " == *" $1 "* ]]; }
N24=24; NAZ=200; NMC=80; LIM=240
if [ "$QUICK" = 1 ]; then N24=8; NAZ=24; NMC=8; LIM=120; fi

POOL=(--gpu_memory_fraction=0.5)
[ "$SMOKE" = 1 ] && POOL=(--num_pages=8192)
BIMODAL=(--workload=bimodal --num_requests=$N24 --seed=20260623 --check_fraction=0.002 --prefill_streams=8
         --chunk_tokens=1024 --warmup_steps=3)
if want bimodal_b8 || want bimodal_b4x2 || want azure_conv || want mooncake_conv; then
  start_worker paged "${POOL[@]}" || exit 1
  P1=$PORT; M1=$MPORT; W1=${PIDS[-1]}
  want bimodal_b8 && run_replay bimodal_b8 "$P1" "$LIM" "${BIMODAL[@]}" --batch=8
  want bimodal_b4x2 && run_replay bimodal_b4x2 "$P1" "$LIM" "${BIMODAL[@]}" --batch=4 --micro_batches=2
  want azure_conv && run_replay azure_conv "$P1" "$LIM" --trace_csv=data/traces/azure_llm_2023_conv_head.csv \
    --honor_arrivals=true --num_requests=$NAZ --batch=32 --seed=20260624 --check_fraction=0.002 --prefill_streams=8 \
    --chunk_tokens=1024 --pool_sample_ms=50
  want mooncake_conv && run_replay mooncake_conv "$P1" "$LIM" --trace_csv=data/traces/mooncake_fast25_conversation_head.csv \
    --honor_arrivals=true --num_requests=$NMC --context_scale=0.25 --max_output=256 --batch=32 --seed=20260625 \
    --check_fraction=0.002 --prefill_streams=8 --chunk_tokens=1024 --pool_sample_ms=50
  scrape "$M1" paged
  kill -TERM "$W1"; wait "$W1"; echo "worker paged exit $?" | tee -a "$WORK/e2e.log"
fi

WORKER_HELP=$("$B/run" pkv-worker --help 2>&1 || true)  # --help exits 1
if want bimodal_b8_graph && grep -q -- '--launch_mode' <<<"$WORKER_HELP"; then
  start_worker graph "${POOL[@]}" --launch_mode=graph || exit 1
  run_replay bimodal_b8_graph "$PORT" "$LIM" "${BIMODAL[@]}" --batch=8
  scrape "$MPORT" graph
  kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}"; echo "worker graph exit $?" | tee -a "$WORK/e2e.log"
fi

# Static baseline: every sequence reserves 8192 tokens (max context) at creation; 24576 pages
# (48 GiB) hold the 32 rows plus 8 prompts written ahead.
if want azure_conv_static; then
  start_worker static --num_pages=24576 --static_slot_tokens=8192 || exit 1
  run_replay azure_conv_static "$PORT" "$LIM" --trace_csv=data/traces/azure_llm_2023_conv_head.csv \
    --honor_arrivals=true --num_requests=$NAZ --batch=32 --seed=20260624 --check_fraction=0.002 --prefill_streams=8 \
    --prefill_ahead=8 --chunk_tokens=1024 --pool_sample_ms=50
  scrape "$MPORT" static
  kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}"; echo "worker static exit $?" | tee -a "$WORK/e2e.log"
fi
trap - EXIT

python3 - "$WORK" "$COMMIT" <<'PY' | tee "$WORK/summary.md"
import json, os, sys
work, commit = sys.argv[1], sys.argv[2]
rows = []
for name in ["bimodal_b8", "bimodal_b4x2", "bimodal_b8_graph", "azure_conv", "azure_conv_static", "mooncake_conv"]:
    p = os.path.join(work, name + ".json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))
    mib = 1024 * 1024
    rows.append("| %s | %d/%d | %.0f | %.3f / %.3f | %.3f / %.3f | %.3f / %.3f | %.2f / %.2f / %.2f | %.0f | %.0f / %.0f | %.0f | %d / %d |" % (
        name, r["requests_done"], r["requests_total"], r["decode_tokens_per_s"],
        r["layer_step_ms"]["p50"], r["layer_step_ms"]["p99"], r["overhead_ms"]["p50"], r["overhead_ms"]["p99"],
        r["layer_step_ms"]["p50"] - r["server_ms"]["p50"], r["queue_ms"]["p99"],
        r["tbt_ms"]["p50"], r["tbt_ms"]["p99"], r["tbt_ms"]["max"], r["worst_window_tokens_per_s"],
        r["kv_reserved_mean_bytes"] / mib, r["kv_reserved_peak_bytes"] / mib, r["kv_used_mean_bytes"] / mib,
        r["outputs_checked"], r["check_failures"]))
print("commit %s; 32 layers, Hq 32, Hkv 8, d 128, page 16, fp16, loopback gRPC" % commit)
print()
print("| run | done | decode tok/s | layer step ms p50 / p99 | beyond attention ms p50 / p99 | transport+client ms p50 / engine-thread wait ms p99 | between tokens ms p50 / p99 / max | worst 1 s window tok/s | KV reserved MiB mean / peak | KV used MiB mean | checked / failed |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
tar czf "$OUT/e2e.tgz" -C "$WORK" .
cp "$WORK/summary.md" "$OUT/summary.md"
