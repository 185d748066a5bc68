"""Python client: a B8 layer-step's round trip over StepStream messages against the shared-memory
ring, with the worker's attention skipped (the transport and host floor), alternating twice.
Run from the repository root after scripts/setup.sh:  .venv/bin/python bench/results/cpu-python-ring/ring_bench.py
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests", "python"))
import persistentkv as pkv  # noqa: E402
from worker_process import WorkerProcess  # noqa: E402

worker = WorkerProcess(num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                       num_pages=2048, extra_flags=("--attention=skip",))
client = pkv.Client(worker.target, router_id="bench")
rng = np.random.default_rng(1)
shape, batch = client.shape, 8
prompt = rng.standard_normal((32, 64, 8, 128)).astype(np.float16)
q = rng.standard_normal(shape.q_shape(batch)).astype(np.float16)
k = rng.standard_normal(shape.kv_shape(batch)).astype(np.float16)
for i, ring in enumerate((False, True, False, True)):
    seqs = list(range(100 + 10 * i, 100 + 10 * i + batch))
    for s in seqs:
        client.write_prompt(s, prompt, prompt)
    with client.step_stream(shared_memory_ring=ring) as stream:
        micro = stream.micro_batch()
        for s in seqs:
            micro.add(s)
        start, n = time.perf_counter(), 0
        for _ in range(6):
            step = micro.token_step()
            for layer in range(shape.num_layers):
                step.step(layer, q, k, k)
                n += 1
        seconds = time.perf_counter() - start
    print(f"{'ring' if ring else 'messages'}: {seconds / n * 1e3:.3f} ms per B8 layer-step ({n} layer-steps)")
client.close()
worker.stop()
