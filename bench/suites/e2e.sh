# bench/suites/e2e.sh — the gRPC worker end to end, sourced by bench/gpu.sh. pkv-worker (CUDA
# shellcheck shell=bash
# backend, calibration profile PROFILE [the shipped profile of this GPU: H200 or H100]) on
# loopback, driven by pkv-replay; 32 layers, Hq 32, Hkv 8, d 128, page 16, fp16; sampled outputs
# checked against the replay's own double-precision reference in every run:
#   kernel_only        `pkv-bench trace` of B8 bimodal (seed 20260623, 24 requests, 48 token steps
#                      after 3 warm-up, adaptive arm, same profile): the engine without gRPC, the
#                      yardstick of the two steady runs below (skipped when pkv-bench is missing)
#   steady_b8          the same requests over gRPC, every prompt written before decode starts
#                      (--wait_for_prefill), the same 3 + 48 token steps: decode alone
#   steady_b4x2        the same rows as two micro-batches of 4 in flight
#   steady_b2x4        the same rows as four micro-batches of 2 in flight
#   bimodal_b8         B8 bimodal with prompts streaming in while decode runs (8 WriteKV
#                      streams): decode next to ingest, compared with steady_b8
#   bimodal_b4x2       the same rows as two interleaved micro-batches of 4
#   azure_conv         Azure conversation slice with its arrival times (bursts): time between
#                      tokens, worst 1 s window, reserved vs used KV
#   azure_conv_static  the same against a worker in the static-reservation baseline mode
#                      (--static_slot_tokens=8192: max context reserved per sequence)
#   mooncake_conv      Mooncake conversation slice with its arrival times (prompts scaled 1/4)
# RUNS="name ..." runs only those. WORKER_ARGS and REPLAY_ARGS add flags to every pkv-worker and
# pkv-replay (e.g. WORKER_ARGS="--grpc_arg=grpc.http2.max_frame_size=1048576"). TRANSPORT=unix
# puts them on a Unix domain socket instead of loopback TCP; TRANSPORT=shm passes the decode
# layer-steps through a shared-memory ring (pkv-replay --shared_memory --shared_memory_ring).
# --quick shortens every run; --smoke checks the suite without a
# GPU (CPU backend, 2 layers, prompts scaled to 1/64).
# Output: worker-*.log, replay-*.log, NAME.json (pkv-replay reports), NAME.timeline.csv (their
# time series, for bench/plots.py), kernel_only.{csv,log},
# metrics-*.txt (the worker's /metrics at the end), e2e.log, summary.md (the tables printed last:
# every run, then the ratios against kernel-only and against steady decode).
suite_e2e() {
  local backend=cuda n24=24 naz=200 nmc=80 limit=600 scale=() pool=(--gpu_memory_fraction=0.5)
  local profile="${PROFILE:-}"
  [[ -z "$profile" ]] && profile=$(pkv_shipped_profile)
  local model=(--num_layers=32 --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --dtype=fp16)
  if [[ "$SMOKE" == 1 ]]; then
    backend=cpu; scale=(--context_scale=0.015625 --max_output=8); pool=(--num_pages=8192); profile=""
    model=(--num_layers=2 --num_q_heads=8 --num_kv_heads=2 --head_dim=64 --page_size=16 --dtype=fp16)
  fi
  if [[ "$QUICK" == 1 ]]; then n24=8; naz=24; nmc=8; limit=240; fi
  local log="$SUITE_OUT/e2e.log"
  pkv_host_info "$log"
  pkv_need pkv-worker pkv-replay || return 1
  E2E_PIDS=()
  # shellcheck disable=SC2317  # called by the EXIT trap
  stop_all() { local p; for p in "${E2E_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
  trap stop_all EXIT

  # start_worker NAME ARGS...: starts a worker; sets PORT, MPORT and WPID.
  start_worker() {
    local name="$1"; shift
    local wlog="$SUITE_OUT/worker-$name.log"
    "$BIN/pkv-worker" --listen="$(pkv_listen "worker-$name")" --metrics_listen=127.0.0.1:0 --backend=$backend "${model[@]}" \
      --max_message_bytes=268435456 --scatter_seed=20260622 ${profile:+--calibration_profile="$profile"} ${WORKER_ARGS:-} "$@" \
      >"$wlog" 2>&1 &
    WPID=$!
    E2E_PIDS+=("$WPID")
    if ! TARGET=$(pkv_wait_target "$wlog" "$WPID"); then
      tail -20 "$wlog"; echo "worker $name did not start"; return 1
    fi
    MPORT=$(sed -n 's/.*pkv-worker metrics on port \([0-9]*\).*/\1/p' "$wlog" | head -n1)
    echo "worker $name on $TARGET (metrics $MPORT): $*" | tee -a "$log"
  }
  stop_worker() { kill -TERM "$WPID"; wait "$WPID"; echo "worker $1 exit $?" | tee -a "$log"; }
  # run_replay NAME ARGS...
  run_replay() {
    local name="$1"; shift
    echo "== $name: pkv-replay $*" | tee -a "$log"
    timeout "$limit" "$BIN/pkv-replay" --target="$TARGET" --progress_s=15 \
      --report_json="$SUITE_OUT/$name.json" --timeline_csv="$SUITE_OUT/$name.timeline.csv" "$@" "${scale[@]}" \
      $(pkv_transport_flags) ${REPLAY_ARGS:-} >"$SUITE_OUT/replay-$name.log" 2>&1
    echo "rc $?" >>"$SUITE_OUT/replay-$name.log"
    tail -n 16 "$SUITE_OUT/replay-$name.log" | tee -a "$log"
  }
  scrape() {
    python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(
      "http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=5).read().decode())' "$1" >"$SUITE_OUT/metrics-$2.txt" 2>&1
  }
  want() { [[ -z "${RUNS:-}" || " $RUNS " == *" $1 "* ]]; }

  local bimodal=(--workload=bimodal --num_requests="$n24" --seed=20260623 --check_fraction=0.002 --prefill_streams=8
                 --chunk_tokens=1024 --warmup_steps=3)
  local azure=(--trace_csv=data/traces/azure_llm_2023_conv_head.csv --honor_arrivals=true --num_requests="$naz"
               --batch=32 --seed=20260624 --check_fraction=0.002 --prefill_streams=8 --chunk_tokens=1024
               --pool_sample_ms=50)
  local steady=(--workload=bimodal --num_requests="$n24" --seed=20260623 --check_fraction=0.002 --chunk_tokens=1024
                --prefill_ahead="$n24" --wait_for_prefill --warmup_steps=3 --max_steps=51)
  if want kernel_only && [[ "$SMOKE" != 1 && -x "$BIN/pkv-bench" ]]; then
    echo "== kernel_only: pkv-bench trace" | tee -a "$log"
    "$BIN/pkv-bench" trace --workloads=bimodal:8 --seeds=20260623 --requests="$n24" --steps=48 --layers=32 \
      ${profile:+--profile="$profile"} --csv="$SUITE_OUT/kernel_only.csv" --commit="$COMMIT" \
      >"$SUITE_OUT/kernel_only.log" 2>&1
    echo "rc $?" | tee -a "$log"
  fi
  if want steady_b8 || want steady_b4x2 || want steady_b2x4 || want bimodal_b8 || want bimodal_b4x2 || want azure_conv || want mooncake_conv; then
    start_worker paged "${pool[@]}" || return 1
    want steady_b8 && run_replay steady_b8 "${steady[@]}" --batch=8
    want steady_b4x2 && run_replay steady_b4x2 "${steady[@]}" --batch=4 --micro_batches=2
    want steady_b2x4 && run_replay steady_b2x4 "${steady[@]}" --batch=2 --micro_batches=4
    want bimodal_b8 && run_replay bimodal_b8 "${bimodal[@]}" --batch=8
    want bimodal_b4x2 && run_replay bimodal_b4x2 "${bimodal[@]}" --batch=4 --micro_batches=2
    want azure_conv && run_replay azure_conv "${azure[@]}"
    want mooncake_conv && run_replay mooncake_conv --trace_csv=data/traces/mooncake_fast25_conversation_head.csv \
      --honor_arrivals=true --num_requests=$nmc --context_scale=0.25 --max_output=256 --batch=32 --seed=20260625 \
      --check_fraction=0.002 --prefill_streams=8 --chunk_tokens=1024 --pool_sample_ms=50
    scrape "$MPORT" paged
    stop_worker paged
  fi
  # Static baseline: every sequence reserves 8192 tokens (max context) at creation; 24576 pages
  # (48 GiB at this shape) hold the 32 rows plus 8 prompts written ahead.
  if want azure_conv_static; then
    start_worker static --num_pages=24576 --static_slot_tokens=8192 || return 1
    run_replay azure_conv_static "${azure[@]}" --prefill_ahead=8
    scrape "$MPORT" static
    stop_worker static
  fi
  trap - EXIT
  pkv_section "e2e"
  python3 - "$SUITE_OUT" "$COMMIT" "${model[*]}" "$(pkv_transport_name)" <<'PY' | tee "$SUITE_OUT/summary.md"
import json, os, sys
out, commit, model = sys.argv[1], sys.argv[2], sys.argv[3]
rows, failed = [], 0
reports = {}
for name in ["steady_b8", "steady_b4x2", "steady_b2x4", "bimodal_b8", "bimodal_b4x2", "azure_conv", "azure_conv_static",
             "mooncake_conv"]:
    p = os.path.join(out, name + ".json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))
    reports[name] = r
    mib = 1024 * 1024
    # The steady runs stop after a fixed number of token steps (--max_steps): unfinished requests
    # are expected there; everywhere else every request must finish.
    failed += r["check_failures"] + (0 if name.startswith("steady_") else r["requests_total"] - r["requests_done"])
    rows.append("| %s | %d/%d | %.0f | %.3f / %.3f | %.3f / %.3f | %.3f / %.3f | %.2f / %.2f / %.2f | %.0f | %.0f / %.0f | %.0f | %d / %d |" % (
        name, r["requests_done"], r["requests_total"], r["decode_tokens_per_s"],
        r["layer_step_ms"]["p50"], r["layer_step_ms"]["p99"], r["overhead_ms"]["p50"], r["overhead_ms"]["p99"],
        r["layer_step_ms"]["p50"] - r["server_ms"]["p50"], r["queue_ms"]["p99"],
        r["tbt_ms"]["p50"], r["tbt_ms"]["p99"], r["tbt_ms"]["max"], r["worst_window_tokens_per_s"],
        r["kv_reserved_mean_bytes"] / mib, r["kv_reserved_peak_bytes"] / mib, r["kv_used_mean_bytes"] / mib,
        r["outputs_checked"], r["check_failures"]))
print("commit %s; %s; %s" % (commit, model, sys.argv[4]))
print()
print("| run | done | decode tok/s | layer step ms p50 / p99 | beyond attention ms p50 / p99 | transport+client ms p50 / engine-thread wait ms p99 | between tokens ms p50 / p99 / max | worst 1 s window tok/s | KV reserved MiB mean / peak | KV used MiB mean | checked / failed |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))

# Ratios measured in this call: gRPC service against the engine alone, and decode next to prompt
# ingest against decode alone.
ratios = []
kernel = None
csv = os.path.join(out, "kernel_only.csv")
if os.path.exists(csv):
    import csv as csvmod
    for row in csvmod.DictReader(open(csv)):
        if row["arm"] == "adaptive" and row["workload"] == "bimodal":
            kernel = float(row["tok_per_s_wall"])
if kernel:
    ratios.append("| kernel-only (pkv-bench trace, adaptive, wall) | %.0f tok/s | 1.00 |" % kernel)
    for name, target in [("steady_b8", 0.75), ("steady_b4x2", 0.9), ("steady_b2x4", 0.9)]:
        if name in reports:
            t = reports[name]["decode_tokens_per_s"]
            ratios.append("| %s / kernel-only (target >= %.2f) | %.0f tok/s | %.2f |" % (name, target, t, t / kernel))
for name, base in [("bimodal_b8", "steady_b8"), ("bimodal_b4x2", "steady_b4x2")]:
    if name in reports and base in reports:
        a, b = reports[name], reports[base]
        ratios.append("| %s between-token p99 / %s p99 (target <= 2) | %.1f / %.1f ms | %.2f |" % (
            name, base, a["tbt_ms"]["p99"], b["tbt_ms"]["p99"], a["tbt_ms"]["p99"] / max(b["tbt_ms"]["p99"], 1e-9)))
for name in ["steady_b8", "steady_b4x2", "steady_b2x4", "bimodal_b8", "azure_conv", "mooncake_conv"]:
    if name in reports:
        r = reports[name]
        ratios.append("| %s layer step p99 / p50 (steady target <= 2) | %.3f / %.3f ms | %.2f |" % (
            name, r["layer_step_ms"]["p99"], r["layer_step_ms"]["p50"], r["layer_step_ms"]["p99"] / max(r["layer_step_ms"]["p50"], 1e-9)))
        ratios.append("| %s between-token p99 / p50 (steady target <= 1.5) | %.1f / %.1f ms | %.2f |" % (
            name, r["tbt_ms"]["p99"], r["tbt_ms"]["p50"], r["tbt_ms"]["p99"] / max(r["tbt_ms"]["p50"], 1e-9)))
        if r.get("median_window_tokens_per_s"):
            ratios.append("| %s worst 1 s window / median window (target >= 0.5) | %.0f / %.0f tok/s | %.2f |" % (
                name, r["worst_window_tokens_per_s"], r["median_window_tokens_per_s"],
                r["worst_window_tokens_per_s"] / r["median_window_tokens_per_s"]))
# Prompt ingest against decode: each layer-step that overlapped a prompt write, later than the
# median layer-step of its batch size and kind (layer 0, which also carries the token step's
# page-table deltas and plan, or a later layer) that overlapped none, in units of a later layer's
# median at that batch size; layer 0's own figure follows.
for name in ["bimodal_b8", "bimodal_b4x2", "azure_conv", "mooncake_conv"]:
    h = reports.get(name, {}).get("ingest_hold_layer_steps")
    if h and h["n"]:
        ms = reports[name]["ingest_hold_ms"]
        f = reports[name].get("ingest_hold_first_layer_steps") or {"n": 0, "p99": 0, "max": 0}
        q = reports[name].get("ingest_quiet_excess_layer_steps") or {"n": 0, "p99": 0, "max": 0}
        ratios.append("| %s prompt ingest holds a layer step back by, in layer steps, p99 (max) (target <= 1; %d of %d overlapped compared; layer 0 alone: %.2f (%.2f), n=%d; control, the quiet layer steps against the same medians: %.2f (%.2f), n=%d) | %.3f (%.3f) ms | %.2f (%.2f) |" % (
            name, h["n"], reports[name]["ingest_overlapped_layer_steps"], f["p99"], f["max"], f["n"], q["p99"], q["max"], q["n"], ms["p99"], ms["max"], h["p99"], h["max"]))
if ratios:
    print()
    print("| ratio (this call) | figures | ratio |")
    print("|---|---|---|")
    print("\n".join(ratios))
sys.exit(1 if failed or not rows else 0)
PY
}
