#!/usr/bin/env bash
# bench/gpu_e2e.sh — the gRPC worker on the GPU, end to end: pkv-worker (CUDA backend, calibrated
# profile) from a bundle made here with ../shared/tools/make-gpu-bundle.sh, driven over loopback
# by pkv-replay (WriteKV of every prompt, continuous batching over all layers, outputs checked
# against the replay's own double-precision reference). Output under $OUT.
#   bench/gpu_e2e.sh [BUNDLE_DIR] (default .gpubundle)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
B="${1:-.gpubundle}"
chmod +x "$B/run" "$B"/bin/* 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/e2e.log"
"$B/run" pkv-worker --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --backend=cuda \
  --num_layers=32 --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --page_size=16 --dtype=fp16 \
  --gpu_memory_fraction=0.8 --max_message_bytes=268435456 --scatter_seed=20260622 \
  --calibration_profile=scheduler/profiles/h100-hq32-hkv8-d128-p16-fp16.json >"$OUT/worker.log" 2>&1 &
W=$!
PORT=""; MPORT=""
for _ in $(seq 1 300); do
  PORT=$(sed -n 's/.*pkv-worker listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$OUT/worker.log" | head -n1)
  [ -n "$PORT" ] && break
  kill -0 $W 2>/dev/null || break
  sleep 0.2
done
MPORT=$(sed -n 's/.*pkv-worker metrics on port \([0-9]*\).*/\1/p' "$OUT/worker.log" | head -n1)
[ -n "$PORT" ] || { cat "$OUT/worker.log"; echo "worker did not start"; exit 1; }
echo "worker on $PORT (metrics $MPORT)" | tee -a "$OUT/e2e.log"
run_replay() {
  local name="$1"; shift
  echo "== $name: pkv-replay $*" | tee -a "$OUT/e2e.log"
  timeout 200 "$B/run" pkv-replay --target=127.0.0.1:$PORT --progress_s=20 "$@" 2>&1 | tee "$OUT/replay-$name.log" | tail -n 14 | tee -a "$OUT/e2e.log"
}
run_replay bimodal_b8 --workload=bimodal --batch=8 --num_requests=16 --context_scale=0.125 --seed=20260623 \
  --check_fraction=0.01 --chunk_tokens=512
run_replay azure_conv --trace_csv=data/traces/azure_llm_2023_conv_head.csv --honor_arrivals=false --batch=8 \
  --num_requests=24 --max_output=64 --seed=20260624 --check_fraction=0.01 --chunk_tokens=512
python3 - "$MPORT" >"$OUT/metrics.txt" 2>&1 <<'PY'
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())
PY
grep -E '^pkv_(decode_tokens_total|scheduler_decisions_total\{kernel="workqueue"|scheduler_decisions_total\{kernel="sequence_split"|scheduler_decisions_total\{kernel="per_request"|build_info|kv_pool_pages)' "$OUT/metrics.txt" | grep -v ' 0$' | tee -a "$OUT/e2e.log"
kill -TERM $W; wait $W; echo "worker exit $?" | tee -a "$OUT/e2e.log"
tail -3 "$OUT/worker.log"
