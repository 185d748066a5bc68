# bench/suites/experiments.sh — kernel tuning experiments, sourced by bench/gpu.sh (needs a build
# shellcheck shell=bash
# on this host): (1) the cp.async pipeline depth, PKV_KV_STAGES=4 against the default 3, on a
# subset of `pkv-bench kernels` (a second build in BUILD_DIR-stages4); (2) an Nsight Compute
# profile of the work-queue kernel on a latency-bound case (B8 x 2048), when ncu is installed.
# Output: exp_build.log, exp_s3.md, exp_s4.md, ncu_wq_b8x2048.txt; a short comparison.
suite_experiments() {
  # shellcheck disable=SC2054  # commas belong to the flag values
  local subset=(--dtypes=fp16 --batches=1,4,8,64 --contexts=2048,8192,32768 --b1-extra=4096,16384 --mixed-steps=2)
  if [[ -n "${PKV_BIN:-}" ]]; then pkv_say "experiments build a variant: not with --bin"; return 1; fi
  pkv_need pkv-bench || return 1
  local dir="${PKV_BUILD_DIR:-build-bench}-stages4"
  [[ "$dir" = /* ]] || dir="$ROOT/$dir"
  if pkv_configure "$dir" "$SUITE_OUT/exp_build.log" "-DCMAKE_CUDA_FLAGS=-DPKV_KV_STAGES=4" &&
     cmake --build "$dir" -j "${PKV_JOBS:-$(nproc)}" --target pkv-bench >>"$SUITE_OUT/exp_build.log" 2>&1; then
    "$BIN/pkv-bench" kernels "${subset[@]}" --md="$SUITE_OUT/exp_s3.md" >/dev/null 2>&1
    "$dir/bin/pkv-bench" kernels "${subset[@]}" --md="$SUITE_OUT/exp_s4.md" >/dev/null 2>&1
    pkv_section "stages 3 vs 4 (best us, % stream)"
    paste -d'|' <(grep '^| fp16' "$SUITE_OUT/exp_s3.md" | awk -F'|' '{printf "%-16s %8s %6s", $3, $9, $11}') \
                <(grep '^| fp16' "$SUITE_OUT/exp_s4.md" | awk -F'|' '{printf " %8s %6s", $9, $11}')
  else
    echo "stage-4 build failed"; tail -5 "$SUITE_OUT/exp_build.log"
  fi
  if command -v ncu >/dev/null; then
    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      -k regex:WorkQueueKernel -c 2 "$BIN/pkv-bench" kernels --dtypes=fp16 --batches=8 --contexts=2048 \
      --b1-extra= --mixed=0 --runs=1 --warmup=0 >"$SUITE_OUT/ncu_wq_b8x2048.txt" 2>&1
    echo "ncu rc=$?"
    grep -E "DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Grid Size" \
      "$SUITE_OUT/ncu_wq_b8x2048.txt" | head -40
  else
    echo "no ncu: the Nsight Compute profile is skipped"
  fi
}
