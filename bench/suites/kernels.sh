# bench/suites/kernels.sh — `pkv-bench kernels`, sourced by bench/gpu.sh: every kernels/cuda route
# shellcheck shell=bash
# on the G=4 grid (Hq 32, Hkv 8, d 128, page 16; fp16 and bf16) with mixed steps, then G=1 (Hq 8)
# and G=8 (Hq 64) on a reduced fp16 grid; FlashInfer columns when built with its arm.
# Every case also times the scheduler's plan for it ("planned": the configuration the engine runs)
# next to the search's best (an oracle); G=4 plans with PROFILE [the shipped profile of this GPU:
# H200, else H100], G=1 and G=8 with the built-in default profile.
# BENCH=full|quick|none (--quick: quick), G18=0 skips G=1 / G=8.
# Output: kernels_g4.{csv,md}, kernels_g1.csv, kernels_g8.csv, kernels_g1_g8.md; key rows printed.
suite_kernels() {
  local bench="${BENCH:-full}" grid=() steps=3 rc=0 hq g profile="${PROFILE:-$(pkv_shipped_profile)}"
  [[ "$QUICK" == 1 && -z "${BENCH:-}" ]] && bench=quick
  [[ "$bench" == none ]] && return 0
  pkv_host_info "$SUITE_OUT/host.txt"
  pkv_need pkv-bench || return 1
  # shellcheck disable=SC2054  # commas belong to the flag values
  if [[ "$bench" == quick ]]; then grid=(--batches=1,8,64 --contexts=2048,32768 --b1-extra=4096,16384); steps=1; fi
  "$BIN/pkv-bench" kernels "${grid[@]}" --mixed-steps=$steps --commit="$COMMIT" --profile="$profile" \
    --csv="$SUITE_OUT/kernels_g4.csv" --md="$SUITE_OUT/kernels_g4.md" >"$SUITE_OUT/kernels_g4.log" 2>&1 || rc=1
  echo "bench G=4: rc=$rc"
  if [[ "${G18:-1}" == 1 ]]; then
    for hq in 8 64; do
      g=$((hq / 8))
      "$BIN/pkv-bench" kernels --dtypes=fp16 --batches=1,8,64 --contexts=2048,32768 --b1-extra=4096,16384 \
        --mixed-steps=1 --hq=$hq --commit="$COMMIT" --csv="$SUITE_OUT/kernels_g$g.csv" \
        --md="$SUITE_OUT/kernels_g$g.md" >"$SUITE_OUT/kernels_g$g.log" 2>&1
      local grc=$?
      echo "bench G=$g: rc=$grc"
      ((grc == 0)) || rc=1
    done
    cat "$SUITE_OUT/kernels_g1.md" "$SUITE_OUT/kernels_g8.md" >"$SUITE_OUT/kernels_g1_g8.md" 2>/dev/null &&
      rm -f "$SUITE_OUT/kernels_g1.md" "$SUITE_OUT/kernels_g8.md"
  fi
  [[ -f "$SUITE_OUT/kernels_g4.md" ]] || { tail -5 "$SUITE_OUT/kernels_g4.log"; return 1; }
  pkv_section "key rows (G=4)"
  grep -E "^- (GPU|ceilings)" "$SUITE_OUT/kernels_g4.md"
  grep -E "\| (B1x4096|B1x16384|B1x131072|B8x32768|B16x131072|B64x8192|B64x32768) \|" "$SUITE_OUT/kernels_g4.md"
  sed -n '/mixed workload/,$p' "$SUITE_OUT/kernels_g4.md"
  for g in 1 8; do
    [[ -f "$SUITE_OUT/kernels_g$g.csv" ]] && echo "G=$g best % stream per case:" &&
      awk -F, '$14==1 {printf "  %s %s %.1f%%\n", $1, $2, $12}' "$SUITE_OUT/kernels_g$g.csv" | head -12
  done
  return $rc
}
