#!/usr/bin/env bash
# bench/step_breakdown.sh — where one layer-step's time goes, stage by stage, at steady decode.
#
# Starts pkv-worker twice on loopback, once computing attention (--attention=run) and once with
# --attention=skip (every host step, no KV write and no attention: the transport and host floor),
# and against each runs pkv-replay at steady decode for every batch size in BATCHES and every
# micro-batch count in MICRO: all prompts are written before decode starts (--prefill_ahead and
# --wait_for_prefill), every row decodes the same number of tokens, the first WARMUP token steps
# are left out. Each replay writes its JSON report; a markdown table of decode tokens/s, the
# p50 / p99 of every stage (client build .. client receive, see pkv-replay's report) and the
# client's own CPU is printed last and saved as summary.md.
#
#   bench/step_breakdown.sh [BIN]
# BIN: a folder with pkv-worker and pkv-replay (default build/bin), or a bundle folder with a
# `run` wrapper (`BIN/run pkv-worker ...`).
# Environment (defaults in brackets; GPU = a CUDA device answers nvidia-smi):
#   BACKEND   cuda or cpu [cuda on a GPU host, else cpu]
#   CONTEXT   prompt tokens per row [2048 on cuda, 32 on cpu]
#   STEPS     decode tokens per row, at most 32 so that every row decodes the same count [32]
#   WARMUP    token steps per micro-batch left out of the statistics [4]
#   BATCHES   rows per micro-batch ["1 8"];  MICRO  micro-batches in flight ["1 4"]
#   MODEL     pkv-worker shape flags [32 layers, Hq 32, Hkv 8, d 128, page 16, fp16]
#   CPU_THREADS  attention threads of the CPU backend [1]
#   SERVICE_THREADS  worker threads for decode steps [4, so that micro-batches overlap]
#   CHECK     share of outputs checked in the run mode [0.01]
#   OUTDIR    where the logs, JSON reports and summary.md go [a new temporary folder]
#   LABEL     a line for the summary's header (e.g. the machine) [none]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-$ROOT/build/bin}"
if [ -x "$BIN/run" ]; then RUN=("$BIN/run"); WORKER=pkv-worker; REPLAY=pkv-replay
else RUN=(); WORKER="$BIN/pkv-worker"; REPLAY="$BIN/pkv-replay"; fi
if [ -z "${BACKEND:-}" ]; then
  if nvidia-smi -L >/dev/null 2>&1; then BACKEND=cuda; else BACKEND=cpu; fi
fi
if [ "$BACKEND" = cuda ]; then CONTEXT="${CONTEXT:-2048}"; else CONTEXT="${CONTEXT:-32}"; fi
STEPS="${STEPS:-32}"
if [ "$STEPS" -gt 32 ]; then echo "STEPS=$STEPS: at most 32 (equal decode lengths)"; exit 2; fi
WARMUP="${WARMUP:-4}"
BATCHES="${BATCHES:-1 8}"
MICRO="${MICRO:-1 4}"
CHECK="${CHECK:-0.01}"
read -r -a MODEL_ARGS <<<"${MODEL:---num_layers=32 --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --dtype=fp16}"
OUTDIR="${OUTDIR:-$(mktemp -d -t pkv-breakdown.XXXXXX)}"
mkdir -p "$OUTDIR"

# Pool: the CPU backend gets exactly what the largest run holds (pages of 16 tokens; a page of
# every layer of the default shape is 2 MiB of host memory); the GPU backend its default share of
# device memory.
max_of() { local m=0; for x in "$@"; do [ "$x" -gt "$m" ] && m=$x; done; echo "$m"; }
MAXB=$(max_of $BATCHES); MAXM=$(max_of $MICRO)
POOL=()
if [ "$BACKEND" = cpu ]; then
  POOL=(--num_pages=$((MAXB * MAXM * ((CONTEXT + STEPS + 15) / 16 + 1) + 8)) --cpu_threads="${CPU_THREADS:-1}")
fi

WPID=""
cleanup() { [ -n "$WPID" ] && kill -TERM "$WPID" 2>/dev/null; }
trap cleanup EXIT

# start_worker MODE: starts pkv-worker with --attention=MODE and sets PORT.
start_worker() {
  local log="$OUTDIR/worker-$1.log"
  "${RUN[@]}" "$WORKER" --listen=127.0.0.1:0 --metrics_listen= --backend="$BACKEND" "${MODEL_ARGS[@]}" \
    "${POOL[@]}" --service_threads="${SERVICE_THREADS:-4}" --max_message_bytes=268435456 \
    --attention="$1" >"$log" 2>&1 &
  WPID=$!
  PORT=""
  for _ in $(seq 1 600); do
    PORT=$(sed -n 's/.*pkv-worker listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -n1)
    [ -n "$PORT" ] && return 0
    kill -0 "$WPID" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$log"
  echo "pkv-worker --attention=$1 did not start"
  return 1
}

stop_worker() { kill -TERM "$WPID"; wait "$WPID"; WPID=""; }

{
  echo "step_breakdown: backend $BACKEND, ${MODEL_ARGS[*]}, context $CONTEXT, $STEPS decode tokens per row ($WARMUP warm-up steps)"
  [ -n "${LABEL:-}" ] && echo "$LABEL"
  echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
} | tee "$OUTDIR/header.txt"

FAILED=0
for mode in run skip; do
  start_worker "$mode" || exit 1
  for b in $BATCHES; do
    for m in $MICRO; do
      n=$((b * m))
      name="$mode-b$b-m$m"
      echo "== $name" >&2
      "${RUN[@]}" "$REPLAY" --target=127.0.0.1:"$PORT" --workload=homogeneous --num_requests=$n \
        --batch=$b --micro_batches=$m --prefill_ahead=$n --wait_for_prefill --max_context="$CONTEXT" \
        --max_output="$STEPS" --warmup_steps="$WARMUP" --check_fraction="$CHECK" --chunk_tokens=1024 \
        --progress_s=0 --pool_sample_ms=0 --report_json="$OUTDIR/$name.json" >"$OUTDIR/replay-$name.log" 2>&1
      rc=$?
      if [ $rc -ne 0 ]; then FAILED=1; echo "pkv-replay $name exited $rc:"; tail -5 "$OUTDIR/replay-$name.log"; fi
    done
  done
  stop_worker
done
trap - EXIT

python3 - "$OUTDIR" "$BATCHES" "$MICRO" <<'PY' | tee "$OUTDIR/summary.md"
import json, os, sys
out, batches, micro = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
print(open(os.path.join(out, "header.txt")).read().strip())
print()
stages = [("client_build", "build"), ("client_send", "send"), ("to_worker", "to worker"),
          ("worker_queue", "queue"), ("worker_validate", "validate"), ("worker_host", "host"),
          ("h2d", "H2D"), ("kernels", "kernels"), ("d2h", "D2H"), ("worker_serialize", "serialize"),
          ("worker_other", "worker other"), ("back_to_client", "back"), ("client_receive", "receive"),
          ("round_trip", "round trip")]
print("Per layer-step, ms, p50 / p99. Client CPU: the decode thread's CPU per layer-step (p50) and "
      "the whole replay process in cores over the measured phase.")
print()
print("| attention | B x micro-batches | decode tok/s | " + " | ".join(s[1] for s in stages) +
      " | client CPU ms/step, cores | checked / failed |")
print("|---" * (len(stages) + 5) + "|")
for mode in ["run", "skip"]:
    for b in batches:
        for m in micro:
            p = os.path.join(out, f"{mode}-b{b}-m{m}.json")
            if not os.path.exists(p):
                print(f"| {mode} | {b} x {m} | (no report) |")
                continue
            r = json.load(open(p))
            cells = ["%.3f / %.3f" % (r["breakdown_ms"][k]["p50"], r["breakdown_ms"][k]["p99"]) for k, _ in stages]
            checks = "skipped" if r["attention_skipped"] else "%d / %d" % (r["outputs_checked"], r["check_failures"])
            print(f"| {mode} | {b} x {m} | %.0f | " % r["decode_tokens_per_s"] + " | ".join(cells) +
                  " | %.3f, %.2f | %s |" % (r["client_thread_cpu_ms"]["p50"], r["client_cpu_cores"], checks))
PY
echo "reports in $OUTDIR"
exit $FAILED
