#!/usr/bin/env bash
# The main job, from a fresh clone: set-up and build, start pkv-worker on the default backend
# (CUDA when compiled in and a GPU is present, else CPU) on a loopback port, replay a short
# workload against it with pkv-replay, then stop the worker with SIGTERM and check it drained and
# exited 0. Extra arguments go to pkv-replay (e.g. --workload=zipf --batch=8).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
BIN=build/bin
LOG=$(mktemp -t pkv-worker.XXXXXX.log)

# A small model so the CPU backend finishes in about a minute on two cores.
"$BIN/pkv-worker" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --backend=auto \
  --num_layers=4 --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --dtype=fp16 \
  --num_pages=4096 --scatter_seed=20260622 >"$LOG" 2>&1 &
WORKER=$!
cleanup() { kill "$WORKER" 2>/dev/null || true; }
trap cleanup EXIT

PORT=""
for _ in $(seq 1 100); do
  PORT=$(sed -n 's/.*pkv-worker listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$LOG" | head -n1)
  [ -n "$PORT" ] && break
  if ! kill -0 "$WORKER" 2>/dev/null; then cat "$LOG"; echo "demo: worker exited early" >&2; exit 1; fi
  sleep 0.1
done
[ -n "$PORT" ] || { cat "$LOG"; echo "demo: worker did not report its port" >&2; exit 1; }
echo "demo: worker up on 127.0.0.1:$PORT (log $LOG)"

"$BIN/pkv-replay" --target="127.0.0.1:$PORT" --workload=bimodal --context_scale=0.0625 \
  --num_requests=12 --batch=4 --seed=20260623 --check_fraction=0.05 "$@"

kill -TERM "$WORKER"
set +e
wait "$WORKER"
RC=$?
set -e
trap - EXIT
tail -n 3 "$LOG"
if [ "$RC" != 0 ]; then echo "demo: worker exited with $RC" >&2; exit 1; fi
echo "demo: worker drained and exited 0"
