# bench/suites/serving.sh — the engine on the CUDA backend, sourced by bench/gpu.sh:
# shellcheck shell=bash
# pkv-calibrate fits the cost-model profile of this GPU (scheduler/cost_profile.h), then
# `pkv-bench trace` drives the engine like a serving loop with every arm and the adaptive choice
# under that profile; FlashInfer arms and adaptive/FI ratios when built with its arm. Extra:
# `pkv-bench ingest` (merged staged WriteKV ingest vs a pinned cudaMemcpy). The engine's own GPU
# test is in the `tests` suite.
# TRACE=full|quick|none (--quick: quick = one seed, 8 layers), SEEDS, LAYERS, EXTRAS=0,
# PROFILE_IN=path (use that profile instead of calibrating).
# Output: calibrate.log, <gpu>-hq32-hkv8-d128-p16-fp16.json, trace.{csv,md,log}, ingest.md.
suite_serving() {
  local trace="${TRACE:-full}" layers="${LAYERS:-32}" profile
  local seeds="${SEEDS:-20260623,20260624,20260625,20260626,20260627}"
  [[ "$QUICK" == 1 && -z "${TRACE:-}" ]] && trace=quick
  pkv_host_info "$SUITE_OUT/host.txt"
  pkv_need pkv-calibrate pkv-bench || return 1
  if [[ -n "${PROFILE_IN:-}" ]]; then
    profile="$PROFILE_IN"
    echo "profile: $profile (PROFILE_IN; no calibration)"
  else
    profile="$SUITE_OUT/$(pkv_gpu_tag)-hq32-hkv8-d128-p16-fp16.json"
    timeout 600 "$BIN/pkv-calibrate" --out="$profile" 2>&1 | tee "$SUITE_OUT/calibrate.log"
    [[ -f "$profile" ]] || profile=""
  fi
  local wl="bimodal:8,uniform:8,zipf:8,bimodal:4,bucketed:1" args=()
  if [[ "$trace" != none ]]; then
    args=(--workloads="$wl" --seeds="$seeds" --layers="$layers")
    [[ "$trace" == quick ]] && args=(--workloads="$wl" --seeds=20260623 --layers=8)
    [[ -n "$profile" ]] && args+=(--profile="$profile")
    "$BIN/pkv-bench" trace "${args[@]}" --csv="$SUITE_OUT/trace.csv" --md="$SUITE_OUT/trace.md" \
      --commit="$COMMIT" 2>"$SUITE_OUT/trace.err" | tee "$SUITE_OUT/trace.log"
    tail -5 "$SUITE_OUT/trace.err"
  fi
  if [[ "${EXTRAS:-1}" != 0 ]]; then
    # Merged staged WriteKV ingest against a plain pinned cudaMemcpy of the same bytes.
    "$BIN/pkv-bench" ingest --md="$SUITE_OUT/ingest.md" --commit="$COMMIT" 2>&1 | tee "$SUITE_OUT/ingest.log" | tail -8
  fi
  pkv_section "serving"
  echo "profile: ${profile:-none (calibration failed)}"
  [[ -n "$profile" ]]
}
