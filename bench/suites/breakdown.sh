# bench/suites/breakdown.sh — where one layer-step's time goes, stage by stage, at steady decode;
# shellcheck shell=bash
# sourced by bench/gpu.sh.
#
# Starts pkv-worker twice on loopback, once computing attention (--attention=run) and once with
# --attention=skip (every host step, no KV write and no attention: the transport and host floor),
# and against each runs pkv-replay at steady decode for every batch size in BATCHES and every
# micro-batch count in MICRO: all prompts are written before decode starts (--prefill_ahead and
# --wait_for_prefill), every row decodes the same number of tokens, the first WARMUP token steps
# are left out. Each replay writes its JSON report; a markdown table of decode tokens/s, the
# p50 / p99 of every stage (client build .. client receive, see pkv-replay's report) and the
# client's own CPU is printed last and saved as summary.md.
# Environment (defaults in brackets; GPU = a CUDA device answers nvidia-smi):
#   BACKEND   cuda or cpu [cuda on a GPU host, else cpu; cpu with --smoke]
#   CONTEXT   prompt tokens per row [2048 on cuda, 32 on cpu]
#   STEPS     decode tokens per row, at most 32 so that every row decodes the same count [32]
#   WARMUP    token steps per micro-batch left out of the statistics [4]
#   BATCHES   rows per micro-batch ["1 8"];  MICRO  micro-batches in flight ["1 4"]
#   MODEL     pkv-worker shape flags [32 layers, Hq 32, Hkv 8, d 128, page 16, fp16]
#   CPU_THREADS  attention threads of the CPU backend [1]
#   SERVICE_THREADS  worker threads for decode steps [4, so that micro-batches overlap]
#   CHECK     share of outputs checked in the run mode [0.01]
#   WORKER_ARGS  extra pkv-worker flags for both workers (e.g. "--service_spin_us=0") [none]
#   REPLAY_ARGS  extra pkv-replay flags for every run [none]
#   LABEL     a line for the summary's header (e.g. the machine) [none]
#   TRANSPORT tcp (loopback) or unix (a Unix domain socket) between pkv-replay and pkv-worker, or
#             shm (decode layer-steps through a shared-memory ring, the session on loopback) [tcp]
suite_breakdown() {
  local backend="${BACKEND:-}" context steps warmup batches micro check model_args=() pool=()
  if [[ -z "$backend" ]]; then
    if [[ "$SMOKE" != 1 ]] && pkv_has_gpu; then backend=cuda; else backend=cpu; fi
  fi
  if [[ "$backend" == cuda ]]; then context="${CONTEXT:-2048}"; else context="${CONTEXT:-32}"; fi
  steps="${STEPS:-32}"
  if ((steps > 32)); then echo "STEPS=$steps: at most 32 (equal decode lengths)"; return 2; fi
  warmup="${WARMUP:-4}"; batches="${BATCHES:-1 8}"; micro="${MICRO:-1 4}"; check="${CHECK:-0.01}"
  read -r -a model_args <<<"${MODEL:---num_layers=32 --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --dtype=fp16}"
  pkv_need pkv-worker pkv-replay || return 1

  # Pool: the CPU backend gets exactly what the largest run holds (pages of 16 tokens; a page of
  # every layer of the default shape is 2 MiB of host memory); the GPU backend its default share of
  # device memory.
  local maxb=0 maxm=0 x
  for x in $batches; do ((x > maxb)) && maxb=$x; done
  for x in $micro; do ((x > maxm)) && maxm=$x; done
  if [[ "$backend" == cpu ]]; then
    pool=(--num_pages=$((maxb * maxm * ((context + steps + 15) / 16 + 1) + 8)) --cpu_threads="${CPU_THREADS:-1}")
  fi

  WPID=""
  trap '[[ -n "$WPID" ]] && kill -TERM "$WPID" 2>/dev/null' EXIT
  {
    echo "step breakdown: backend $backend, ${model_args[*]}, context $context, $steps decode tokens per row ($warmup warm-up steps)"
    [[ -n "${LABEL:-}" ]] && echo "$LABEL"
    echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    echo "commit: $COMMIT"
    [[ -n "${WORKER_ARGS:-}" ]] && echo "worker flags: $WORKER_ARGS"
    [[ -n "${REPLAY_ARGS:-}" ]] && echo "replay flags: $REPLAY_ARGS"
    echo "transport: $(pkv_transport_name)"
  } | tee "$SUITE_OUT/header.txt"

  local failed=0 mode b m n name rc wlog
  for mode in run skip; do
    wlog="$SUITE_OUT/worker-$mode.log"
    "$BIN/pkv-worker" --listen="$(pkv_listen "worker-$mode")" --metrics_listen= --backend="$backend" "${model_args[@]}" \
      "${pool[@]}" --service_threads="${SERVICE_THREADS:-4}" --max_message_bytes=268435456 \
      --attention="$mode" ${WORKER_ARGS:-} >"$wlog" 2>&1 &
    WPID=$!
    if ! TARGET=$(pkv_wait_target "$wlog" "$WPID"); then
      tail -20 "$wlog"; echo "pkv-worker --attention=$mode did not start"; return 1
    fi
    for b in $batches; do
      for m in $micro; do
        n=$((b * m))
        name="$mode-b$b-m$m"
        echo "== $name" >&2
        "$BIN/pkv-replay" --target="$TARGET" --workload=homogeneous --num_requests=$n \
          --batch="$b" --micro_batches="$m" --prefill_ahead=$n --wait_for_prefill --max_context="$context" \
          --max_output="$steps" --warmup_steps="$warmup" --check_fraction="$check" --chunk_tokens=1024 \
          --progress_s=0 --pool_sample_ms=0 --report_json="$SUITE_OUT/$name.json" $(pkv_transport_flags) ${REPLAY_ARGS:-} >"$SUITE_OUT/replay-$name.log" 2>&1
        rc=$?
        if ((rc != 0)); then failed=1; echo "pkv-replay $name exited $rc:"; tail -5 "$SUITE_OUT/replay-$name.log"; fi
      done
    done
    kill -TERM "$WPID"; wait "$WPID"; WPID=""
  done
  trap - EXIT

  pkv_section "step breakdown"
  python3 - "$SUITE_OUT" "$batches" "$micro" <<'PY' | tee "$SUITE_OUT/summary.md"
import json, os, sys
out, batches, micro = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
print(open(os.path.join(out, "header.txt")).read().strip())
print()
stages = [("client_build", "build"), ("client_send", "send"), ("to_worker", "to worker"),
          ("worker_queue", "queue"), ("worker_validate", "validate"), ("worker_host", "host"),
          ("h2d", "H2D"), ("kernels", "kernels"), ("d2h", "D2H"), ("worker_serialize", "serialize"),
          ("worker_other", "worker other"), ("back_to_client", "back"), ("client_receive", "receive"),
          ("round_trip", "round trip")]
print("Per layer-step, ms, p50 / p99. H2D, kernels, D2H and worker other: only the layer-steps whose "
      "device stages the worker timed (the CUDA backend times one in 16 per descriptor slot; "
      "\"timed\" gives how many of all). Client CPU: the decode thread's CPU per layer-step (p50) "
      "and the whole replay process in cores over the measured phase.")
print()
print("| attention | B x micro-batches | decode tok/s | " + " | ".join(s[1] for s in stages) +
      " | timed | client CPU ms/step, cores | checked / failed |")
print("|---" * (len(stages) + 6) + "|")
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
            timed = "%d / %d" % (r["breakdown_ms"]["kernels"]["n"], r["breakdown_ms"]["round_trip"]["n"])
            print(f"| {mode} | {b} x {m} | %.0f | " % r["decode_tokens_per_s"] + " | ".join(cells) +
                  " | %s | %.3f, %.2f | %s |" % (timed, r["client_thread_cpu_ms"]["p50"], r["client_cpu_cores"], checks))
PY
  return $failed
}
