#!/usr/bin/env bash
# bench/cpu_step_overhead.sh — the host and RPC cost of a layer-step, without a GPU: pkv-worker on
# the CPU backend (one attention thread) with the target model shape (32 layers, Hq 32, Hkv 8,
# d 128, page 16, fp16) and tiny contexts, driven by pkv-replay over loopback at B8. The replay
# splits each layer-step's round trip into the worker's share (StepResponse.server_seconds: engine
# thread wait, validation, the layer) and transport + client; "beyond attention" is the round trip
# minus the worker's attention time. These are CPU figures of this machine, not GPU ones.
#   bench/cpu_step_overhead.sh [BIN_DIR] (default build/bin); extra pkv-replay flags in REPLAY_ARGS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-$ROOT/build/bin}"
LOG="$(mktemp -t pkv-overhead.XXXXXX.log)"
"$BIN/pkv-worker" --listen=127.0.0.1:0 --metrics_listen= --backend=cpu --cpu_threads=1 --num_layers=32 \
  --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --num_pages=512 >"$LOG" 2>&1 &
W=$!
trap 'kill $W 2>/dev/null || true' EXIT
PORT=""
for _ in $(seq 1 200); do
  PORT=$(sed -n 's/.*pkv-worker listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$LOG" | head -n1)
  [ -n "$PORT" ] && break
  sleep 0.1
done
[ -n "$PORT" ] || { cat "$LOG"; exit 1; }
echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
# shellcheck disable=SC2086
"$BIN/pkv-replay" --target=127.0.0.1:"$PORT" --workload=uniform --num_requests=16 --context_scale=0.0005 \
  --max_output=40 --batch=8 --check_fraction=0 --progress_s=0 ${REPLAY_ARGS:-} 2>&1 |
  grep -E "decode tokens/s|layer step|beyond|in the worker|token step"
kill -TERM $W; wait $W; trap - EXIT
