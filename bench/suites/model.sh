# bench/suites/model.sh — a real model's decode through the worker, sourced by bench/gpu.sh.
# shellcheck shell=bash
# Starts pkv-worker (CUDA backend on a GPU host, else CPU) with the attention shape of an 8B-like
# Llama (32 layers, Hq 32, Hkv 8, d 128, page 16, bf16) and runs
# python/examples/llama_decode_bench.py against it: transformers' LlamaForCausalLM with seeded
# random weights (hidden 4096, SwiGLU 14336) in bf16 on the GPU, attention of every layer in the
# worker, greedy decode with MICRO micro-batches of BATCH rows; it reports tokens/s, time between
# tokens, the share of each token step spent waiting for the worker vs in the model's own layers,
# and compares the first micro-batch's tokens with the model's own generate.
# Environment: PKV_PYTHON (a python with torch, transformers, grpcio and persistentkv)
# [.venv/bin/python when scripts/setup.sh made it, else python3]; BATCH [8]; MICRO [1 2]
# (one run each); PROMPT [512]; STEPS [64]; MODEL_ARGS (more flags for the script, e.g.
# --shared_memory_ring=1: the layer-steps through the worker's shared-memory ring).
# --smoke: CPU backend and a tiny model (no GPU needed).
# Output: worker.log, model-mN.log and model-mN.json per micro-batch count, summary.md.
suite_model() {
  local py="${PKV_PYTHON:-}" device=cuda backend=cuda shape dims=() m rc=0
  if [[ -z "$py" ]]; then if [[ -x "$ROOT/.venv/bin/python" ]]; then py="$ROOT/.venv/bin/python"; else py=python3; fi; fi
  shape=(--num_layers=32 --num_q_heads=32 --num_kv_heads=8 --head_dim=128)
  if [[ "$SMOKE" == 1 ]] || ! pkv_has_gpu; then
    device=cpu; backend=cpu
    shape=(--num_layers=2 --num_q_heads=4 --num_kv_heads=2 --head_dim=64)
    dims=(--layers=2 --hidden=256 --heads=4 --kv_heads=2 --intermediate=512 --vocab=512 --dtype=fp32)
  fi
  pkv_need pkv-worker || return 1
  local wlog="$SUITE_OUT/worker.log" pool=(--gpu_memory_fraction=0.3)
  [[ "$backend" == cpu ]] && pool=(--num_pages=2048)
  "$BIN/pkv-worker" --listen=127.0.0.1:0 --metrics_listen= --backend=$backend "${shape[@]}" --page_size=16 \
    --dtype=bf16 "${pool[@]}" --max_message_bytes=268435456 >"$wlog" 2>&1 &
  local wpid=$! target
  # shellcheck disable=SC2064
  trap "kill -TERM $wpid 2>/dev/null" EXIT
  if ! target=$(pkv_wait_target "$wlog" "$wpid"); then tail -20 "$wlog"; echo "pkv-worker did not start"; return 1; fi
  for m in ${MICRO:-1 2}; do
    # shellcheck disable=SC2086
    "$py" "$ROOT/python/examples/llama_decode_bench.py" --target="$target" --device=$device "${dims[@]}" \
      --batch="${BATCH:-8}" --micro_batches="$m" --prompt_len="${PROMPT:-512}" --steps="${STEPS:-64}" \
      --report_json="$SUITE_OUT/model-m$m.json" ${MODEL_ARGS:-} >"$SUITE_OUT/model-m$m.log" 2>&1 || rc=1
    tail -2 "$SUITE_OUT/model-m$m.log"
  done
  kill -TERM "$wpid"; wait "$wpid"; trap - EXIT
  {
    echo "commit $COMMIT; $(pkv_gpu_name 2>/dev/null || echo cpu); worker ${shape[*]} bf16 ($backend)"
    echo
    echo "| micro-batches x rows | decode tok/s | token step ms p50 / p99 | between tokens ms p50 / p99 | waiting for the worker | model layers | tokens identical to the model's own generate (rows) | teacher-forced: max logit diff / max logit, top-1 agreement (where the top two differ by > 2%) | against fp32 of the same weights: worker path / the model's own, max logit diff / max logit |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for m in ${MICRO:-1 2}; do
      [[ -f "$SUITE_OUT/model-m$m.json" ]] || continue
      python3 - "$SUITE_OUT/model-m$m.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r.get("compare", {})
t = r.get("teacher_forced", {})
f = r.get("fp32_reference", {})
print("| %d x %d | %.0f | %.1f / %.1f | %.1f / %.1f | %.0f%% | %.0f%% | %s | %s | %s |" % (
    r["micro_batches"], r["batch"], r["decode_tokens_per_s"], r["token_step_ms"]["p50"], r["token_step_ms"]["p99"],
    r["tbt_ms"]["p50"], r["tbt_ms"]["p99"], 100 * r["share_waiting_for_worker"], 100 * r["share_model_layers"],
    "%d/%d over %d tokens" % (c["rows_identical"], len(c["identical_prefix_per_row"]), c["tokens_per_row"]) if c else "-",
    "%.1e, %.1f%% (%.1f%%)" % (t["max_rel_logit_diff"], 100 * t["top1_agreement"], 100 * t["top1_agreement_clear_margin"]) if t else "-",
    "%.1e / %.1e" % (f["worker_path_max_rel_logit_diff"], f["model_own_max_rel_logit_diff"]) if f else "-"))
PY
    done
  } | tee "$SUITE_OUT/summary.md"
  return $rc
}
