# bench/suites/scaling.sh — the adaptive choice beyond the headline shape, sourced by bench/gpu.sh:
# shellcheck shell=bash
# G=1 (Hq 8) and G=8 (Hq 64), each with its own pkv-calibrate profile, and larger batches (B16,
# B64) at G=4 under the shipped profile of this GPU (H200's, else H100's; PROFILE=path for another). 8 layers per token step
# and 2 held-out seeds, shorter than the `serving` suite.
# Output: <gpu>-hq{8,64}-hkv8-d128-p16-fp16.json, calibrate-hq*.log, trace-hq*.{md,csv,log},
# trace-large-b.{md,csv,log}.
suite_scaling() {
  local seeds=20260623,20260624 hq p rc=0
  local base="${PROFILE:-$(pkv_shipped_profile)}"
  pkv_host_info "$SUITE_OUT/host.txt"
  pkv_need pkv-calibrate pkv-bench || return 1
  for hq in 8 64; do
    p="$SUITE_OUT/$(pkv_gpu_tag)-hq$hq-hkv8-d128-p16-fp16.json"
    timeout 600 "$BIN/pkv-calibrate" --hq=$hq --samples=8 --out="$p" >"$SUITE_OUT/calibrate-hq$hq.log" 2>&1
    grep -E "mean \|error\||wrote" "$SUITE_OUT/calibrate-hq$hq.log"
    [[ -f "$p" ]] || { rc=1; continue; }
    "$BIN/pkv-bench" trace --hq=$hq --layers=8 --seeds=$seeds --workloads=bimodal:8,zipf:8,bucketed:1 \
      --profile="$p" --commit="$COMMIT" --md="$SUITE_OUT/trace-hq$hq.md" --csv="$SUITE_OUT/trace-hq$hq.csv" 2>&1 |
      tee "$SUITE_OUT/trace-hq$hq.log" | grep -E "adaptive|ceiling"
  done
  "$BIN/pkv-bench" trace --layers=8 --seeds=$seeds --workloads=uniform:16,bimodal:16,uniform:64 \
    --profile="$base" --commit="$COMMIT" --md="$SUITE_OUT/trace-large-b.md" --csv="$SUITE_OUT/trace-large-b.csv" 2>&1 |
    tee "$SUITE_OUT/trace-large-b.log" | grep -E "adaptive|ceiling"
  return $rc
}
