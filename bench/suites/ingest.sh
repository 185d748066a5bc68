# bench/suites/ingest.sh — prompt KV ingest on the GPU, sourced by bench/gpu.sh:
# shellcheck shell=bash
#   1. device_kv_arena_test (staged ingest from one and from several threads against host
#      writes), then `pkv-bench ingest` with one writer thread and with eight: the engine's staged
#      path next to a pinned cudaMemcpy of the same bytes;
#   2. when pkv-ingest-bench is built (it needs the service), it on the CUDA backend for 1 and 8
#      streams: raw loopback TCP, the engine alone and WriteKV over loopback gRPC, same bytes,
#      same run. INGEST_THREADS: the worker's ingest executor threads [4]. COPY_THREADS: the
#      threads helping them copy prompt KV into pinned memory (--ingest_copy_threads) [4].
# Output: device_kv_arena_test.log, ingest.md (every table), ingest-writers{1,8}.log, ingest-rpc.*.
suite_ingest() {
  local w rc=0
  pkv_host_info "$SUITE_OUT/host.txt"
  pkv_need pkv-bench device_kv_arena_test '?pkv-ingest-bench' || return 1
  "$BIN/device_kv_arena_test" >"$SUITE_OUT/device_kv_arena_test.log" 2>&1 || rc=1
  echo "device_kv_arena_test rc=$rc"
  grep -E "^\[  (PASSED|FAILED) |Failure|staged ingest" "$SUITE_OUT/device_kv_arena_test.log"
  for w in 1 8; do
    "$BIN/pkv-bench" ingest --writers=$w --copy_threads="${COPY_THREADS:-4}" --md="$SUITE_OUT/ingest.md" --commit="$COMMIT" 2>&1 |
      tee "$SUITE_OUT/ingest-writers$w.log" | tail -3
  done
  if [[ -x "$BIN/pkv-ingest-bench" ]]; then
    "$BIN/pkv-ingest-bench" --backend=cuda --streams=1,8 --prompt_tokens=4096 --layers=32 \
      --ingest_threads="${INGEST_THREADS:-4}" --ingest_copy_threads="${COPY_THREADS:-4}" --label="$(pkv_gpu_name), $(nproc) cores" \
      --md="$SUITE_OUT/ingest.md" --commit="$COMMIT" 2>"$SUITE_OUT/ingest-rpc.err" | tee "$SUITE_OUT/ingest-rpc.log"
    tail -3 "$SUITE_OUT/ingest-rpc.err"
  else
    echo "no pkv-ingest-bench (built only with the service): the gRPC arm is skipped"
  fi
  return $rc
}
