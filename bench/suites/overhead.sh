# bench/suites/overhead.sh — the host and RPC cost of a layer-step without a GPU, sourced by
# shellcheck shell=bash
# bench/gpu.sh: pkv-worker on the CPU backend (one attention thread) with the target model shape
# (32 layers, Hq 32, Hkv 8, d 128, page 16, fp16) and tiny contexts, driven by pkv-replay over
# loopback at B8. The replay splits each layer-step's round trip into the worker's share
# (StepResponse.server_seconds: engine thread wait, validation, the layer) and transport + client;
# "beyond attention" is the round trip minus the worker's attention time. These are CPU figures of
# this host, not GPU ones. REPLAY_ARGS: extra pkv-replay flags. Output: worker.log, replay.log.
suite_overhead() {
  local wlog="$SUITE_OUT/worker.log" wpid target rc extra=()
  pkv_need pkv-worker pkv-replay || return 1
  "$BIN/pkv-worker" --listen=127.0.0.1:0 --metrics_listen= --backend=cpu --cpu_threads=1 --num_layers=32 \
    --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --num_pages=512 >"$wlog" 2>&1 &
  wpid=$!
  trap 'kill $wpid 2>/dev/null' EXIT
  target=$(pkv_wait_target "$wlog" "$wpid") || { cat "$wlog"; return 1; }
  echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  read -r -a extra <<<"${REPLAY_ARGS:-}"
  "$BIN/pkv-replay" --target="$target" --workload=uniform --num_requests=16 --context_scale=0.0005 \
    --max_output=40 --batch=8 --check_fraction=0 --progress_s=0 "${extra[@]}" >"$SUITE_OUT/replay.log" 2>&1
  rc=$?
  grep -E "decode tokens/s|layer step|beyond|in the worker|token step" "$SUITE_OUT/replay.log"
  kill -TERM $wpid; wait $wpid; trap - EXIT
  return $rc
}
