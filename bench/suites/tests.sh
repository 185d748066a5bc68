# bench/suites/tests.sh — every GPU test (CTest label gpu), sourced by bench/gpu.sh.
# shellcheck shell=bash
# Built here: `ctest -L gpu` in the build folder, so a GPU test added to tests/ runs too. With
# --bin: the GPU_TESTS binaries found there. SANITIZE=1 then runs compute-sanitizer memcheck and
# racecheck on the kernel shape and page-size sweeps. Output: tests.log; a PASSED/FAILED digest.
suite_tests() {
  local log="$SUITE_OUT/tests.log" rc=0 t
  pkv_host_info "$SUITE_OUT/host.txt" >/dev/null
  : >"$log"
  if [[ -n "${PKV_BIN:-}" ]]; then
    local tests=() ran=0
    read -r -a tests <<<"${GPU_TESTS:-decode_attention_cuda_test device_kv_arena_test engine_cuda_test flashinfer_arm_test}"
    pkv_need "${tests[@]/#/?}" || return 1
    for t in "${tests[@]}"; do
      [[ -x "$BIN/$t" ]] || continue
      ran=$((ran + 1))
      echo "== $t" >>"$log"
      timeout 600 "$BIN/$t" >>"$log" 2>&1
      local trc=$?
      echo "$t: rc=$trc" | tee -a "$log"
      ((trc == 0)) || rc=1
    done
    if ((ran == 0)); then pkv_say "none of GPU_TESTS is in $PKV_BIN"; return 1; fi
  else
    pkv_need decode_attention_cuda_test engine_cuda_test '?device_kv_arena_test' '?flashinfer_arm_test' || return 1
    (cd "$BIN/.." && ctest -L gpu --output-on-failure --timeout 600) >>"$log" 2>&1 || rc=1
    grep -E "Test +#[0-9]+: |tests passed" "$log"
  fi
  if [[ "${SANITIZE:-0}" == 1 ]]; then
    if [[ -x "$BIN/decode_attention_cuda_test" ]] && command -v compute-sanitizer >/dev/null; then
      local tool
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer $tool (ShapesSweep, PageSizes)" >>"$log"
        timeout 240 compute-sanitizer --tool $tool --print-limit 10 "$BIN/decode_attention_cuda_test" \
          --gtest_filter='*ShapesSweep*:*PageSizes*' 2>&1 | tail -6 >>"$log"
      done
    else
      pkv_say "SANITIZE=1: no compute-sanitizer or no decode_attention_cuda_test"
    fi
  fi
  pkv_section "tests"
  grep -E "^[a-z_]+_test: rc=|^\[  (PASSED|FAILED) |^\[  FAILED  \]|ERROR SUMMARY|Failure" "$log"
  pkv_has_gpu || pkv_say "no GPU visible: the GPU tests skipped themselves"
  return $rc
}
