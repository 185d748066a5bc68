"""persistentkv against a real pkv-worker: Describe, prompts, token steps over Step and
StepStream, micro-batches with open/free deltas, replays, backpressure retries, a worker restart,
and the worker's errors as typed exceptions naming the field."""

from __future__ import annotations

import os
import threading
import unittest

import grpc
import numpy as np

import persistentkv as pkv
from persistentkv import errors, shared_memory
from worker_process import WorkerProcess

SEED = 20260702


def reference_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """q [Hq, d], keys/values [T, Hkv, d] (fp16 values) -> [Hq, d] in double precision."""
    hq, d = q.shape
    group = hq // keys.shape[1]
    k = np.repeat(keys.astype(np.float64), group, axis=1)
    v = np.repeat(values.astype(np.float64), group, axis=1)
    scores = np.einsum("hd,thd->ht", q.astype(np.float64), k) / np.sqrt(d)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.einsum("ht,thd->hd", p, v)


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.worker = WorkerProcess(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64,
                                   page_size=16, num_pages=64)
        cls.client = pkv.Client(cls.worker.target, router_id="router-a")
        cls.rng = np.random.default_rng(SEED)
        cls.next_seq = 1

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()
        cls.worker.stop()

    def seq(self) -> int:
        type(self).next_seq += 1
        return self.next_seq

    def tensor(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float16)

    def prompt(self, tokens: int) -> tuple[int, np.ndarray, np.ndarray]:
        s = self.client.shape
        seq = self.seq()
        k = self.tensor(s.num_layers, tokens, s.num_kv_heads, s.head_dim)
        v = self.tensor(s.num_layers, tokens, s.num_kv_heads, s.head_dim)
        result = self.client.write_prompt(seq, k, v, chunk_tokens=7)
        self.assertEqual(result.num_tokens, tokens)
        return seq, k, v

    def qkv(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.client.shape
        return (self.tensor(*s.q_shape(batch)), self.tensor(*s.kv_shape(batch)), self.tensor(*s.kv_shape(batch)))

    def test_describe(self) -> None:
        info = self.client.describe()
        self.assertIsInstance(info, pkv.WorkerInfo)
        self.assertEqual(info.model, pkv.ModelShape(2, 4, 2, 64, 16, "float16"))
        self.assertEqual(info.backend, os.environ.get("PKV_TEST_BACKEND", "cpu"))
        self.assertEqual(info.router, "router-a")
        self.assertEqual(info.incarnation, self.client.incarnation)
        self.assertNotEqual(info.incarnation, 0)
        self.assertEqual(info.pool.total_pages, 64)
        self.assertTrue(info.serving)
        self.assertGreater(info.limits.max_batch, 0)

    def test_micro_batch_matches_reference_and_frees(self) -> None:
        """Two prompts and an opened sequence decode together; history grows one token per step;
        finished rows are freed by the next token step's layer 0."""
        s = self.client.shape
        base = self.client.describe().pool.used_tokens
        (a, ka, va), (b, kb, vb) = self.prompt(5), self.prompt(20)
        opened = self.seq()
        history = {a: [list(ka[l]) for l in range(2)], b: [list(kb[l]) for l in range(2)], opened: [[], []]}
        values = {a: [list(va[l]) for l in range(2)], b: [list(vb[l]) for l in range(2)], opened: [[], []]}
        batch = self.client.micro_batch()
        batch.add(a)
        batch.add(b)
        batch.open(opened)
        for step_index in range(3):
            step = batch.token_step()
            for layer in range(s.num_layers):
                q, k, v = self.qkv(len(step.rows))
                out = step.step(layer, q, k, v)
                self.assertEqual(out.shape, (len(step.rows), 4, 64))
                self.assertEqual(out.dtype, np.float16)
                for i, seq in enumerate(step.rows):
                    history[seq][layer].append(k[i])
                    values[seq][layer].append(v[i])
                    want = reference_attention(q[i], np.array(history[seq][layer]), np.array(values[seq][layer]))
                    np.testing.assert_allclose(out[i].astype(np.float64), want, atol=2e-3, rtol=2e-3)
        batch.finish(a)
        used = self.client.describe().pool.used_tokens - base
        self.assertEqual(used, (5 + 3) + (20 + 3) + 3)  # a not yet freed: its free rides on the next step
        step = batch.token_step()
        self.assertEqual(step.free, [a])
        q, k, v = self.qkv(2)
        step.step(0, q, k, v)
        step.step(1, q, k, v)
        self.assertEqual(self.client.describe().pool.used_tokens - base, (20 + 4) + 4)
        batch.close()
        self.assertEqual(self.client.describe().pool.used_tokens, base)

    def test_torch_tensors_in_and_out(self) -> None:
        try:
            import torch
        except ImportError:
            self.skipTest("torch is not installed")
        seq, k, v = self.prompt(3)
        step = self.client.token_step([seq])
        q, kn, vn = (torch.from_numpy(x.astype(np.float32)) for x in self.qkv(1))
        out = step.step(0, q, kn, vn)
        self.assertIsInstance(out, torch.Tensor)
        self.assertEqual(out.dtype, torch.float16)
        want = reference_attention(q[0].numpy(), np.concatenate([k[0], kn.numpy().astype(np.float16)]),
                                   np.concatenate([v[0], vn.numpy().astype(np.float16)]))
        np.testing.assert_allclose(out[0].double().numpy(), want, atol=2e-3, rtol=2e-3)
        step.step(1, q, kn, vn)
        self.client.release([seq])

    def test_replay_same_token_step_and_layer(self) -> None:
        base = self.client.describe().pool.used_tokens
        seq, _, _ = self.prompt(4)
        step_id = self.client.next_token_step_id()
        q, k, v = self.qkv(1)
        first = self.client.step(step_id, 0, [seq], q, k, v)
        again = self.client.step(step_id, 0, [seq], q, k, v)
        self.assertFalse(first.replayed)
        self.assertTrue(again.replayed)
        # The CPU backend times every layer-step's attention (CUDA samples it).
        self.assertTrue(first.attention_timed)
        self.assertGreater(first.attend_seconds, 0.0)
        np.testing.assert_array_equal(first.out, again.out)
        self.client.step(step_id, 1, [seq], q, k, v)
        self.assertEqual(self.client.describe().pool.used_tokens - base, 5, "the replay appended nothing")
        self.client.release([seq])

    def test_step_stream_with_two_micro_batches(self) -> None:
        base = self.client.describe().pool.used_tokens
        (a, _, _), (b, _, _) = self.prompt(6), self.prompt(9)
        with self.client.step_stream() as stream:
            first, second = stream.token_step([a], want_lse=True), stream.token_step([b], want_lse=True)
            for layer in range(2):
                pending = [first.send(layer, *self.qkv(1)), second.send(layer, *self.qkv(1))]
                results = [p.result() for p in pending]
                self.assertEqual([r.token_step_id for r in results], [first.id, second.id])
                self.assertEqual(results[0].lse.shape, (1, 4))
        self.assertEqual(self.client.describe().pool.used_tokens - base, 7 + 10)
        self.client.release([a, b])

    @unittest.skipUnless(shared_memory.supported(), "the shared-memory ring needs Linux on x86-64")
    def test_ring_step_stream_matches_reference_and_leaves_nothing(self) -> None:
        """Two micro-batches through the shared-memory ring (two slots, so a third request waits
        for the first answer), every output against the float64 reference; a bad request is
        refused by field and the ring goes on; the region's name is gone afterwards."""
        s = self.client.shape
        base = self.client.describe().pool.used_tokens
        (a, ka, va), (b, kb, vb) = self.prompt(5), self.prompt(9)
        history = {a: [list(ka[l]) for l in range(2)], b: [list(kb[l]) for l in range(2)]}
        values = {a: [list(va[l]) for l in range(2)], b: [list(vb[l]) for l in range(2)]}
        with self.client.step_stream(shared_memory_ring=True, slots=2, max_rows=4) as stream:
            name = stream._ring.name
            first, second = stream.token_step([a], want_lse=True), stream.token_step([b])
            for layer in range(s.num_layers):
                inputs = {a: self.qkv(1), b: self.qkv(1)}
                pending = [first.send(layer, *inputs[a]), second.send(layer, *inputs[b])]
                if layer == 0:
                    q, k, v = self.qkv(1)
                    bad = stream.token_step([a]).send(0, q[:, :2], k, v)  # waits for a slot first
                results = [p.result() for p in pending]
                self.assertEqual([r.token_step_id for r in results], [first.id, second.id])
                self.assertEqual(results[0].lse.shape, (1, 4))
                self.assertIsNone(results[1].lse)
                for seq, result in zip((a, b), results):
                    q, k, v = inputs[seq]
                    history[seq][layer].append(k[0])
                    values[seq][layer].append(v[0])
                    want = reference_attention(q[0], np.array(history[seq][layer]), np.array(values[seq][layer]))
                    np.testing.assert_allclose(result.out[0].astype(np.float64), want, atol=2e-3, rtol=2e-3)
                if layer == 0:
                    with self.assertRaises(pkv.InvalidArgument) as caught:
                        bad.result()
                    self.assertEqual(caught.exception.field, "q.shape")
        self.assertFalse(os.path.exists("/dev/shm" + name), "the region's name was left behind")
        self.assertEqual(self.client.describe().pool.used_tokens - base, (5 + 1) + (9 + 1))
        self.client.release([a, b])
        with self.assertRaises(ValueError):
            with self.client.step_stream(shared_memory_ring=True, max_rows=1) as stream:
                stream.token_step([a, b]).send(0, *self.qkv(2))

    # -- errors ------------------------------------------------------------------------------------

    def assert_error(self, kind: type, field: str, call) -> errors.WorkerError:
        with self.assertRaises(kind) as caught:
            call()
        error = caught.exception
        self.assertEqual(error.code, kind.code)
        self.assertEqual(error.field, field, str(error))
        return error

    def test_wrong_q_shape_is_invalid_argument_naming_q(self) -> None:
        seq, _, _ = self.prompt(2)
        used = self.client.describe().pool.used_tokens
        q, k, v = self.qkv(1)
        error = self.assert_error(pkv.InvalidArgument, "q.shape",
                                  lambda: self.client.token_step([seq]).step(0, q[:, :3], k, v))
        self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("[1, 3, 64]", error.message)
        self.assert_error(pkv.InvalidArgument, "k.shape",
                          lambda: self.client.token_step([seq]).step(0, q, k[:, :, :32], v))
        self.assert_error(pkv.InvalidArgument, "layer",
                          lambda: self.client.token_step([seq]).step(5, q, k, v))
        self.assert_error(pkv.InvalidArgument, "rows[1]",
                          lambda: self.client.token_step([seq, seq]).step(0, *self.qkv(2)))
        self.assertEqual(self.client.describe().pool.used_tokens, used, "failed requests changed nothing")
        self.client.release([seq])

    def test_stream_errors_are_per_request(self) -> None:
        seq, _, _ = self.prompt(2)
        with self.client.step_stream() as stream:
            q, k, v = self.qkv(1)
            bad = stream.token_step([seq]).send(0, q[:, :2], k, v)
            good_step = stream.token_step([seq])
            good = good_step.send(0, q, k, v)
            with self.assertRaises(pkv.InvalidArgument) as caught:
                bad.result()
            self.assertEqual(caught.exception.field, "q.shape")
            self.assertEqual(good.result().out.shape, (1, 4, 64))
            good_step.step(1, q, k, v)
        self.client.release([seq])

    def test_unknown_sequence_layer_order_and_duplicates(self) -> None:
        q, k, v = self.qkv(1)
        self.assert_error(pkv.NotFound, "rows[0]", lambda: self.client.token_step([987654]).step(0, q, k, v))
        seq, pk, pv = self.prompt(2)
        self.assert_error(pkv.FailedPrecondition, "token_step_id",
                          lambda: self.client.token_step([seq]).step(1, q, k, v))
        self.assertRaises(pkv.AlreadyExists, lambda: self.client.write_prompt(seq, pk, pv))
        self.assertRaises(pkv.NotFound, lambda: self.client.release([987654]))
        self.client.release([seq])

    def test_another_router_is_permission_denied(self) -> None:
        seq, _, _ = self.prompt(2)
        with pkv.Client(self.worker.target, router_id="router-b") as other:
            self.assertRaises(pkv.PermissionDenied, lambda: other.token_step([seq]).step(0, *self.qkv(1)))
            self.assertRaises(pkv.PermissionDenied, lambda: other.release([seq]))
        self.client.release([seq])

    def test_kv_pool_full_is_resource_exhausted(self) -> None:
        s = self.client.shape
        used = self.client.describe().pool.used_pages
        tokens = 65 * s.page_size  # one page more than the pool holds
        k = np.zeros((s.num_layers, tokens, s.num_kv_heads, s.head_dim), np.float16)
        error = self.assert_error(pkv.ResourceExhausted, "",
                                  lambda: self.client.write_prompt(self.seq(), k, k))
        self.assertIn("KV pool full", error.message)
        self.assertEqual(self.client.describe().pool.used_pages, used)


class RecoveryTest(unittest.TestCase):
    """Backpressure retries and a worker restart, each against its own worker."""

    def test_backpressure_is_retried(self) -> None:
        # One engine thread and a one-task queue: concurrent routers get "work queue is full",
        # and the client resends the same (token_step_id, layer) until it runs.
        with WorkerProcess(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64, num_pages=256,
                           extra_flags=("--service_threads=1", "--service_queue=1")) as worker:
            retry = pkv.RetryPolicy(max_attempts=200, initial_backoff_s=0.001, max_backoff_s=0.01)
            attempts, failures = [], []

            def router(index: int) -> None:
                try:
                    with pkv.Client(worker.target, router_id=f"r{index}", retry=retry) as client:
                        rng = np.random.default_rng(index)
                        kv = rng.standard_normal((2, 64, 2, 64)).astype(np.float16)
                        client.write_prompt(index + 1, kv, kv)
                        for _ in range(10):
                            step = client.token_step([index + 1])
                            for layer in range(2):
                                q = rng.standard_normal((1, 4, 64))
                                step.step(layer, q, kv[layer, :1], kv[layer, :1])
                                attempts.append(step.last.attempts)
                        client.release([index + 1])
                except Exception as e:  # reported by the main thread
                    failures.append(e)

            threads = [threading.Thread(target=router, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual(failures, [])
            self.assertEqual(len(attempts), 6 * 10 * 2)

    def test_worker_restart_is_worker_restarted(self) -> None:
        first = WorkerProcess(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64, num_pages=64)
        client = pkv.Client(first.target, retry=pkv.RetryPolicy(max_attempts=50, max_backoff_s=0.2))
        kv = np.zeros((2, 3, 2, 64), np.float16)
        client.write_prompt(1, kv, kv)
        pinned = client.incarnation
        self.assertEqual(first.stop(), 0)
        second = WorkerProcess(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64, num_pages=64,
                               port=first.port)
        try:
            self.assertNotEqual(client.describe().incarnation, pinned)  # Describe retried until up
            with self.assertRaises(pkv.WorkerRestarted) as caught:
                client.token_step([1]).step(0, np.zeros((1, 4, 64)), kv[0, :1], kv[0, :1])
            self.assertEqual(caught.exception.field, "expected_incarnation")
            self.assertIsInstance(caught.exception, pkv.FailedPrecondition)
        finally:
            client.close()
            second.stop()


if __name__ == "__main__":
    unittest.main()
