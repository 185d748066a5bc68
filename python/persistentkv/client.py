"""The router/prefill side's Python client of the PersistentKV worker (API v1).

`Client` wraps the gRPC stub in domain terms: `describe()`, prompts written with WriteKV in chunks
(`write_prompt`, or `begin_prompt` for a prompt produced piece by piece), decode driven token
step by token step (`token_step`, `MicroBatch`) over unary Step or a `StepStream`, and
`release()`. Tensors are numpy arrays or torch tensors (see tensors.py); errors are the typed
exceptions of errors.py.

Retries follow worker.proto: a layer whose answer is "work queue is full" or "open token steps
full" (RESOURCE_EXHAUSTED), or that was cut by a transport failure (UNAVAILABLE, except a worker
that is draining), is resent with the same token_step_id and layer after a backoff; a layer that
had already run is answered from the worker's retry cache (`StepResult.replayed`) and appends
nothing. A broken StepStream is reopened and its unanswered requests are resent in order. The
incarnation read at connect travels with every request, so a worker that restarted answers
`WorkerRestarted` instead of serving another incarnation's state.

Threading: a Client may be shared by threads; a StepStream, MicroBatch, TokenStep or
PromptWriter is used by one thread at a time.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import grpc

from persistentkv import errors, shared_memory, tensors
from persistentkv.types import (Limits, ModelShape, OpenTokenStep, PoolInfo, PromptResult,
                                ReleaseResult, StepResult, WorkerInfo)

try:
    from persistentkv._proto import worker_pb2 as pb
    from persistentkv._proto import worker_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - a source checkout that was never built
    raise ImportError(
        "persistentkv: the gRPC stubs are generated when the package is built; install it with "
        "`pip install ./python` from the repository root") from e

__all__ = ["Client", "RetryPolicy", "PromptWriter", "StepStream", "RingStepStream", "TokenStep", "PendingLayer",
           "MicroBatch"]

# Request metadata key naming the router (worker.proto, Routers).
ROUTER_ID_KEY = "x-pkv-router-id"

_WIRE_DTYPE = {tensors.FP16: pb.DTYPE_FP16, tensors.BF16: pb.DTYPE_BF16}
_DTYPE_NAME = {pb.DTYPE_FP16: tensors.FP16, pb.DTYPE_BF16: tensors.BF16, pb.DTYPE_FP32: tensors.FP32}


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failed layer, prompt or Describe is sent again."""

    max_attempts: int = 10  # sends of one request, the first included
    initial_backoff_s: float = 0.002
    max_backoff_s: float = 0.5
    multiplier: float = 2.0
    retry_unavailable: bool = True  # transport failures (never a draining worker)

    def retryable(self, error: errors.WorkerError) -> bool:
        """Whether `error` may go away by itself (backpressure, a cut connection)."""
        if isinstance(error, errors.ResourceExhausted):
            return "work queue" in error.message or "open token steps" in error.message
        if isinstance(error, errors.WorkerDraining):
            return False
        if isinstance(error, errors.Unavailable):
            return self.retry_unavailable
        return False

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait before send number `attempt + 1` (attempt >= 1)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))


def _read_pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or read from a file name."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _fill_tensor(t: Any, x: Any, dtype: str) -> None:
    shape, data = tensors.to_wire_bytes(x, dtype)
    t.dtype = _WIRE_DTYPE[dtype]
    t.shape.extend(shape)
    t.data = data


def _info_from_proto(r: Any) -> WorkerInfo:
    m, p, lim = r.model, r.pool, r.limits
    return WorkerInfo(
        model=ModelShape(m.num_layers, m.num_q_heads, m.num_kv_heads, m.head_dim, m.page_size,
                         _DTYPE_NAME.get(m.dtype, "unspecified")),
        pool=PoolInfo(p.total_pages, p.free_pages, p.used_pages, p.page_bytes, p.num_sequences,
                      p.reserved_tokens, p.used_tokens),
        backend=r.backend,
        device=r.device,
        limits=Limits(lim.max_batch, lim.max_message_bytes, lim.max_open_token_steps,
                      lim.retry_window_token_steps, lim.max_prompt_tokens, lim.max_sequences,
                      lim.max_open_per_step, lim.max_free_per_step, lim.token_step_idle_seconds,
                      lim.prompt_idle_seconds, lim.sequence_idle_seconds, lim.check_finite),
        active_sequences=r.active_sequences,
        writing_sequences=r.writing_sequences,
        open_token_steps=r.open_token_steps,
        serving=r.serving,
        incarnation=r.incarnation,
        router=r.router,
        open_steps=tuple(OpenTokenStep(s.token_step_id, s.router, s.rows, s.layers_done, s.idle_seconds)
                         for s in r.open_steps),
    )


class Client:
    """A connection to one worker, as one router.

    Args:
      target: "host:port".
      router_id: sent as x-pkv-router-id on every call; sequences and token steps belong to it
        (a worker serving mutual TLS takes the client certificate's identity instead). None: the
        anonymous router.
      tls: use TLS with the system roots; implied by any of the three PEM options.
      root_certificates, certificate_chain, private_key: PEM bytes or file names: the CA that
        signed the worker's certificate, and the client certificate and key for mutual TLS.
      server_name: the name to check the worker's certificate against, when not the target host.
      pin_incarnation: read the worker's incarnation now and send it with every request.
      retry: the RetryPolicy.
      timeout_s: deadline of each unary call and prompt.
      connect_timeout_s: how long the constructor waits for the channel (Unavailable after).
      max_message_bytes: send/receive limit of the channel.
      ingest_connection: send prompts (WriteKV) over a TCP connection of their own, so that bulk
        prompt bytes never queue ahead of decode steps on the decode connection (the transport
        delivers one connection's bytes in order). False: one connection for everything.
    """

    def __init__(self, target: str, *, router_id: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | os.PathLike | None = None,
                 certificate_chain: bytes | str | os.PathLike | None = None,
                 private_key: bytes | str | os.PathLike | None = None,
                 server_name: str | None = None, pin_incarnation: bool = True,
                 retry: RetryPolicy = RetryPolicy(), timeout_s: float = 120.0,
                 connect_timeout_s: float = 10.0, max_message_bytes: int = 256 << 20,
                 ingest_connection: bool = True) -> None:
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("certificate_chain and private_key must be given together")
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        use_tls = tls or root_certificates is not None or certificate_chain is not None
        if use_tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_certificates), private_key=_read_pem(private_key),
                certificate_chain=_read_pem(certificate_chain))
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
        else:
            credentials = None

        def open_channel(extra: list[tuple[str, Any]]) -> grpc.Channel:
            if credentials is not None:
                return grpc.secure_channel(target, credentials, options=options + extra)
            return grpc.insecure_channel(target, options=options + extra)

        self._channel = open_channel([])
        # A local subchannel pool gives the ingest channel a connection of its own.
        self._ingest_channel = (open_channel([("grpc.use_local_subchannel_pool", 1),
                                              ("pkv.connection_role", "ingest")])
                                if ingest_connection else None)
        self.target = target
        self.retry = retry
        self.timeout_s = timeout_s
        self._metadata = ((ROUTER_ID_KEY, router_id),) if router_id else ()
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self.close()
            how = ("over TLS (is the worker serving TLS with a certificate for this name, signed by "
                   "the CA given? does it require a client certificate?)" if use_tls else
                   "(plaintext channel: is the worker up? if it serves TLS, pass the TLS options)")
            raise errors.Unavailable(f"cannot connect to {target} within {connect_timeout_s} s {how}",
                                     method="connect") from None
        self._stub = pb_grpc.PersistentKVStub(self._channel)
        self._ingest_stub = (pb_grpc.PersistentKVStub(self._ingest_channel)
                             if self._ingest_channel is not None else self._stub)
        # Token step ids: a random base per client, so that two clients (or two runs) never reuse
        # an id the worker still remembers.
        self._step_ids = itertools.count((secrets.randbits(61) << 1) | (1 << 62))
        self.incarnation = 0  # expected by every request; 0: not pinned
        info = self.describe()
        self.shape: ModelShape = info.model
        self.limits: Limits = info.limits
        if pin_incarnation:
            self.incarnation = info.incarnation

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()
        if self._ingest_channel is not None:
            self._ingest_channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def next_token_step_id(self) -> int:
        """A fresh nonzero token step id."""
        return next(self._step_ids)

    def _call_with_retry(self, method: str, call: Any, policy: RetryPolicy | None = None) -> Any:
        """`call()` until it succeeds or fails with an error the policy does not retry."""
        policy = policy or self.retry
        attempt = 1
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                error = errors.error_from_rpc(e, method)
            if attempt >= policy.max_attempts or not policy.retryable(error):
                raise error
            time.sleep(policy.backoff_s(attempt))
            attempt += 1

    # -- Describe, Release --------------------------------------------------------------------

    def describe(self) -> WorkerInfo:
        """Model shape, pool occupancy, limits and open token steps of the worker."""
        r = self._call_with_retry("Describe", lambda: self._stub.Describe(
            pb.DescribeRequest(), timeout=self.timeout_s, metadata=self._metadata))
        return _info_from_proto(r)

    def release(self, sequence_ids: Iterable[int]) -> ReleaseResult:
        """Frees sequences (all or nothing). Retried on backpressure only, which the worker answers
        before freeing anything: after a cut connection a retry could be NotFound."""
        request = pb.ReleaseRequest(sequence_ids=list(sequence_ids), expected_incarnation=self.incarnation)
        backpressure = RetryPolicy(self.retry.max_attempts, self.retry.initial_backoff_s,
                                   self.retry.max_backoff_s, self.retry.multiplier, retry_unavailable=False)
        r = self._call_with_retry("Release", lambda: self._stub.Release(
            request, timeout=self.timeout_s, metadata=self._metadata), backpressure)
        return ReleaseResult(r.released, r.free_pages, r.incarnation)

    # -- prompts ------------------------------------------------------------------------------

    def begin_prompt(self, sequence_id: int, num_tokens: int) -> "PromptWriter":
        """Opens a WriteKV stream for a prompt of `num_tokens` tokens and sends its header."""
        return PromptWriter(self, sequence_id, num_tokens)

    def default_chunk_tokens(self) -> int:
        """Tokens per KVChunk: a quarter of the message limit, at most 1024."""
        token_bytes = 2 * self.shape.num_kv_heads * self.shape.head_dim * 2  # k and v, 2-byte dtype
        return max(1, min(1024, self.limits.max_message_bytes // 4 // token_bytes))

    def write_prompt(self, sequence_id: int, k: Any, v: Any, *, chunk_tokens: int | None = None) -> PromptResult:
        """Writes a whole prompt's K,V and makes the sequence steppable.

        `k` and `v` are [num_layers, T, Hkv, d] (or a sequence of num_layers [T, Hkv, d] tensors):
        each layer's K,V after RoPE, sent in chunks of `chunk_tokens` tokens. A failed stream
        leaves nothing on the worker, so a retryable failure resends the whole prompt.
        """
        if len(k) != len(v):
            raise ValueError(f"k has {len(k)} layers, v {len(v)}")
        num_tokens = int(k[0].shape[0]) if len(k) else 0
        chunk = chunk_tokens or self.default_chunk_tokens()

        def write_once() -> PromptResult:
            writer = self.begin_prompt(sequence_id, num_tokens)
            try:
                for layer in range(len(k)):
                    for offset in range(0, num_tokens, chunk):
                        end = min(num_tokens, offset + chunk)
                        writer.write(layer, offset, k[layer][offset:end], v[layer][offset:end])
                return writer.finish()
            except BaseException:
                writer.cancel()
                raise

        attempt = 1
        while True:
            try:
                return write_once()
            except errors.WorkerError as error:
                if attempt >= self.retry.max_attempts or not self.retry.retryable(error):
                    raise
            time.sleep(self.retry.backoff_s(attempt))
            attempt += 1

    # -- decode -------------------------------------------------------------------------------

    def step_stream(self, *, shared_memory_ring: bool = False, slots: int = 8, max_rows: int = 64,
                    spin_us: float = 1000.0) -> "StepStream":
        """Opens a StepStream: several micro-batches' layers in flight on one stream.

        shared_memory_ring: pass the layer-steps through a shared-memory ring instead of gRPC
          messages (a router on the worker's host or in its pod, sharing /dev/shm; Linux on
          x86-64; the worker's --shared_memory_max_bytes must allow the region): at most `slots`
          layer-steps in flight, each of at most `max_rows` rows; after each answer the client
          polls for the next one for `spin_us` before it sleeps (persistentkv/shared_memory.py).
        """
        if shared_memory_ring:
            return RingStepStream(self, slots=slots, max_rows=max_rows, spin_s=spin_us * 1e-6)
        return StepStream(self)

    def token_step(self, rows: Sequence[int], *, open: Sequence[int] = (), free: Sequence[int] = (),
                   token_step_id: int | None = None, want_lse: bool = False,
                   stream: "StepStream | None" = None) -> "TokenStep":
        """A token step over `rows` (one token appended per row), stepped layer by layer.

        `open` and `free` are the page-table deltas that its layer 0 applies first. Layers go over
        unary Step, or over `stream` when given.
        """
        return TokenStep(self, rows, open=open, free=free, want_lse=want_lse, stream=stream,
                         token_step_id=token_step_id or self.next_token_step_id())

    def micro_batch(self, *, stream: "StepStream | None" = None, want_lse: bool = False) -> "MicroBatch":
        """A group of sequences decoded together, token step after token step."""
        return MicroBatch(self, stream=stream, want_lse=want_lse)

    def step(self, token_step_id: int, layer: int, rows: Sequence[int], q: Any, k: Any, v: Any, *,
             open: Sequence[int] = (), free: Sequence[int] = (), want_lse: bool = False) -> StepResult:
        """One layer of one token step over unary Step, with retries."""
        request = self._step_request(token_step_id, layer, rows, q, k, v, open, free, want_lse)
        start = time.perf_counter()
        attempts = 0

        def call() -> Any:
            nonlocal attempts
            attempts += 1
            return self._stub.Step(request, timeout=self.timeout_s, metadata=self._metadata)

        response = self._call_with_retry("Step", call)
        return self._step_result(response, q, len(rows), attempts, start)

    def _step_request(self, token_step_id: int, layer: int, rows: Sequence[int], q: Any, k: Any,
                      v: Any, open: Sequence[int], free: Sequence[int], want_lse: bool) -> Any:
        request = pb.StepRequest(token_step_id=token_step_id, layer=layer, rows=list(rows),
                                 open=list(open), free=list(free), want_lse=want_lse,
                                 expected_incarnation=self.incarnation)
        dtype = self.shape.dtype
        _fill_tensor(request.q, q, dtype)
        _fill_tensor(request.k, k, dtype)
        _fill_tensor(request.v, v, dtype)
        return request

    def _step_result(self, r: Any, like: Any, batch: int, attempts: int, start: float) -> StepResult:
        s = self.shape
        if r.out.shape:
            out = tensors.from_wire(r.out.data, list(r.out.shape), _DTYPE_NAME[r.out.dtype], like)
        else:  # a token step without rows: nothing attended
            out = tensors.from_wire(b"", [0, s.num_q_heads, s.head_dim], s.dtype, like)
        lse = tensors.from_wire(r.lse.data, list(r.lse.shape), tensors.FP32, like) if r.lse.shape else None
        return StepResult(token_step_id=r.token_step_id, layer=r.layer, out=out, lse=lse,
                          kernel=r.kernel, replayed=r.replayed, attempts=attempts,
                          attend_seconds=r.attend_seconds, attention_timed=not r.attention_untimed,
                          server_seconds=r.server_seconds,
                          queue_seconds=r.queue_seconds,
                          round_trip_seconds=time.perf_counter() - start, incarnation=r.incarnation)


_CLOSE = object()  # ends a request iterator (half-close)


class PromptWriter:
    """A WriteKV stream in progress. Leaving it without `finish()` (or `cancel()`) cancels it and
    the worker releases the prompt."""

    def __init__(self, client: Client, sequence_id: int, num_tokens: int) -> None:
        self._client = client
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(pb.WriteKVRequest(header=pb.WriteKVHeader(
            sequence_id=sequence_id, num_tokens=num_tokens, expected_incarnation=client.incarnation)))
        self._future = client._ingest_stub.WriteKV.future(iter(self._requests.get, _CLOSE),
                                                   timeout=client.timeout_s, metadata=client._metadata)
        self._done = False

    def write(self, layer: int, token_offset: int, k: Any, v: Any) -> None:
        """Sends K,V ([n, Hkv, d] each) of tokens [token_offset, token_offset + n) of `layer`."""
        if self._done:
            raise errors.FailedPrecondition("the WriteKV stream is already finished", method="WriteKV")
        if self._future.done():  # the worker ended the stream early: its status says why
            self._done = True
            self._raise_final()
        chunk = pb.KVChunk(layer=layer, token_offset=token_offset, num_tokens=int(k.shape[0]))
        dtype = self._client.shape.dtype
        _fill_tensor(chunk.k, k, dtype)
        _fill_tensor(chunk.v, v, dtype)
        self._requests.put(pb.WriteKVRequest(chunk=chunk))

    def finish(self) -> PromptResult:
        """Half-closes and waits for the worker: returns once the sequence is steppable."""
        self._requests.put(_CLOSE)
        self._done = True
        r = self._raise_final()
        return PromptResult(r.sequence_id, r.num_tokens, r.bytes_written, r.num_chunks, r.incarnation)

    def cancel(self) -> None:
        """Cancels the stream; the worker leaves nothing behind."""
        if not self._future.done():
            self._future.cancel()
        self._requests.put(_CLOSE)
        self._done = True

    def _raise_final(self) -> Any:
        try:
            return self._future.result()
        except grpc.RpcError as e:
            raise errors.error_from_rpc(e, "WriteKV") from None
        except grpc.FutureCancelledError:
            raise errors.Cancelled("the WriteKV stream was cancelled", method="WriteKV") from None

    def __del__(self) -> None:
        if not self._done:
            self.cancel()


class PendingLayer:
    """A layer sent on a StepStream, answered by `result()`."""

    def __init__(self, stream: "StepStream | None", request: Any, like: Any, batch: int) -> None:
        self._stream = stream
        self.request = request
        self.like = like
        self.batch = batch
        self.attempts = 1
        self.start = time.perf_counter()
        self._result: StepResult | None = None
        self._error: errors.WorkerError | None = None
        self.on_success: Any = None  # called with the StepResult once answered OK

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def result(self) -> StepResult:
        """Waits for the answer (reading the stream's earlier answers first); raises its error."""
        while not self.done:
            self._stream._read_one()
        if self._error is not None:
            raise self._error
        return self._result

    def _resolve(self, result: StepResult | None, error: errors.WorkerError | None) -> None:
        self._result, self._error = result, error
        if result is not None and self.on_success is not None:
            self.on_success(result)


class StepStream:
    """A StepStream: layers of several token steps (micro-batches) in flight on one stream.

    The worker answers requests in order; a request's answer is read when its PendingLayer's
    `result()` is called, or when a later one's is. A per-request error that the RetryPolicy
    allows is resent on the stream after a backoff; a stream that breaks is reopened and every
    unanswered request resent in order (the worker replays those that had run).
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pending: collections.deque[PendingLayer] = collections.deque()
        self._closed = False
        self._open()

    def _open(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = self._client._stub.StepStream(iter(self._requests.get, _CLOSE),
                                                   metadata=self._client._metadata)

    def token_step(self, rows: Sequence[int], **kwargs: Any) -> "TokenStep":
        """A token step whose layers go over this stream (see Client.token_step)."""
        return self._client.token_step(rows, stream=self, **kwargs)

    def micro_batch(self, *, want_lse: bool = False) -> "MicroBatch":
        return MicroBatch(self._client, stream=self, want_lse=want_lse)

    def send(self, request: Any, like: Any, batch: int) -> PendingLayer:
        """Sends one StepRequest; its answer comes with the returned PendingLayer."""
        if self._closed:
            raise errors.FailedPrecondition("the StepStream is closed", method="StepStream")
        pending = PendingLayer(self, request, like, batch)
        self._pending.append(pending)
        self._requests.put(request)
        return pending

    def _read_one(self) -> None:
        """Reads the oldest unanswered response and resolves (or resends) its request."""
        head = self._pending[0]
        try:
            response = next(self._call)
        except StopIteration:
            self._stream_failed(errors.Unavailable("StepStream closed by the worker", method="StepStream"))
            return
        except grpc.RpcError as e:
            self._stream_failed(errors.error_from_rpc(e, "StepStream"))
            return
        self._answer(head, response)

    def _answer(self, head: PendingLayer, response: Any) -> None:
        """Resolves the oldest request with its response, or resends it after a backoff when its
        error is one the RetryPolicy allows."""
        self._pending.popleft()
        if response.status.code != 0:
            error = errors.error_from_code(response.status.code, response.status.message, "StepStream")
            policy = self._client.retry
            if head.attempts < policy.max_attempts and policy.retryable(error):
                time.sleep(policy.backoff_s(head.attempts))
                head.attempts += 1
                self._pending.append(head)
                self._resend(head.request)
            else:
                head._resolve(None, error)
            return
        head._resolve(self._client._step_result(response, head.like, head.batch, head.attempts,
                                                head.start), None)

    def _resend(self, request: Any) -> None:
        self._requests.put(request)

    def _stream_failed(self, error: errors.WorkerError) -> None:
        """The stream ended: reopen it and resend what is unanswered, or fail all of it."""
        policy = self._client.retry
        attempts = max(p.attempts for p in self._pending)
        if self._closed or attempts >= policy.max_attempts or not policy.retryable(error):
            for p in self._pending:
                p._resolve(None, error)
            self._pending.clear()
            self._closed = True
            return
        time.sleep(policy.backoff_s(attempts))
        self._call.cancel()
        self._open()
        for p in self._pending:
            p.attempts += 1
            self._requests.put(p.request)

    def close(self) -> None:
        """Reads what is still unanswered, then half-closes the stream."""
        while self._pending:
            self._read_one()
        if not self._closed:
            self._closed = True
            self._requests.put(_CLOSE)
            for _ in self._call:  # drain to the stream's end
                pass

    def cancel(self) -> None:
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> "StepStream":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()


class RingStepStream(StepStream):
    """A StepStream whose requests and responses go through a shared-memory ring
    (Client.step_stream(shared_memory_ring=True)). The gRPC stream carries no message: it is the
    session, and its end (or the worker closing the ring) fails what is unanswered. A per-request
    error that the RetryPolicy allows is resent through the ring; a broken stream is not reopened.
    """

    def __init__(self, client: Client, *, slots: int, max_rows: int, spin_s: float) -> None:
        if slots < 1 or max_rows < 1:
            raise ValueError("slots and max_rows must be >= 1")
        s = client.shape
        row_q = s.num_q_heads * s.head_dim * 2
        row_kv = s.num_kv_heads * s.head_dim * 2
        self._max_rows = max_rows
        self._spin_s = spin_s
        # One tensor slot per message slot: [q | k | v | out], each 64-byte aligned.
        self._at_k = shared_memory.align64(row_q * max_rows)
        self._at_v = self._at_k + shared_memory.align64(row_kv * max_rows)
        self._at_out = self._at_v + shared_memory.align64(row_kv * max_rows)
        tensor_slot = self._at_out + shared_memory.align64(row_q * max_rows)
        self._ring = shared_memory.Ring(slots, shared_memory.message_bytes(max_rows, s.num_q_heads), tensor_slot)
        super().__init__(client)

    def _open(self) -> None:
        self._requests = queue.SimpleQueue()
        metadata = self._client._metadata + ((shared_memory.SHARED_MEMORY_KEY, self._ring.name),
                                             (shared_memory.RING_KEY, "1"))
        self._call = self._client._stub.StepStream(iter(self._requests.get, _CLOSE), metadata=metadata)

    def send(self, request: Any, like: Any, batch: int) -> PendingLayer:
        if self._closed:
            raise errors.FailedPrecondition("the StepStream is closed", method="StepStream")
        if batch > self._max_rows:
            raise ValueError(f"{batch} rows exceed this ring's max_rows {self._max_rows}")
        while len(self._pending) >= self._ring.slots:  # the ring holds `slots` unanswered requests
            self._read_one()
        pending = PendingLayer(self, request, like, batch)
        self._pending.append(pending)
        self._publish(request)
        return pending

    def _publish(self, request: Any) -> None:
        """Copies the request's tensors into its tensor slot and the rest into its message slot."""
        ring = self._ring
        slot = ring.tensor_slot_at(ring.requested)
        shared = pb.StepRequest()
        shared.CopyFrom(request)
        for t, at, room in ((shared.q, 0, self._at_k), (shared.k, self._at_k, self._at_v - self._at_k),
                            (shared.v, self._at_v, self._at_out - self._at_v)):
            data = t.data
            if len(data) <= room:  # else it stays in the message, for the worker to refuse
                ring.mm[slot + at:slot + at + len(data)] = data
                t.ClearField("data")
                t.shm.offset = slot + at
        shared.out_shm.offset = slot + self._at_out
        ring.publish(shared.SerializeToString())

    def _read_one(self) -> None:
        head = self._pending[0]
        raw = self._ring.wait_response(self._spin_s, self._call.done)
        if raw is None:
            self._stream_failed(self._final_error())
            return
        self._ring.unlink()  # the worker mapped it when the stream began
        response = pb.StepResponse.FromString(raw)
        if response.out.HasField("shm"):
            size = 2
            for d in response.out.shape:
                size *= d
            at = response.out.shm.offset
            response.out.data = bytes(self._ring.mm[at:at + size])
        self._answer(head, response)

    def _resend(self, request: Any) -> None:
        self._publish(request)

    def _final_error(self) -> errors.WorkerError:
        if self._call.done():
            try:
                code = self._call.code()
            except Exception:  # noqa: BLE001 - a call that never started
                code = None
            if code is not None and code != grpc.StatusCode.OK:
                return errors.error_from_rpc(self._call, "StepStream")
        return errors.Unavailable("StepStream: the worker closed the shared-memory ring", method="StepStream")

    def _stream_failed(self, error: errors.WorkerError) -> None:
        for p in self._pending:
            p._resolve(None, error)
        self._pending.clear()
        self._closed = True
        self._call.cancel()
        self._ring.unlink()

    def close(self) -> None:
        super().close()
        self._ring.unlink()

    def cancel(self) -> None:
        super().cancel()
        self._ring.unlink()


class TokenStep:
    """One token step: every row appends one token; its layers are stepped in order.

    `step(layer, q, k, v)` sends one layer and returns its attention output [B, Hq, d]; on a
    stream, `send(...)` returns a PendingLayer so that the caller can work while the worker runs.
    The open/free deltas ride on layer 0.
    """

    def __init__(self, client: Client, rows: Sequence[int], *, token_step_id: int,
                 open: Sequence[int] = (), free: Sequence[int] = (), want_lse: bool = False,
                 stream: StepStream | None = None, on_deltas_applied: Any = None) -> None:
        self._client = client
        self._stream = stream
        self._on_deltas_applied = on_deltas_applied  # called once layer 0 succeeded
        self.id = token_step_id
        self.rows = list(rows)
        self.open = list(open)
        self.free = list(free)
        self.want_lse = want_lse
        self.last: StepResult | None = None

    def send(self, layer: int, q: Any, k: Any, v: Any) -> PendingLayer:
        """Sends `layer` (on the stream, or as a unary Step answered at once)."""
        deltas = layer == 0
        open_, free = (self.open, self.free) if deltas else ((), ())
        if self._stream is None:
            pending = PendingLayer(None, None, q, len(self.rows))
            if deltas:
                pending.on_success = self._deltas_applied
            try:
                pending._resolve(self._client.step(self.id, layer, self.rows, q, k, v, open=open_,
                                                   free=free, want_lse=self.want_lse), None)
            except errors.WorkerError as error:
                pending._resolve(None, error)
            return pending
        request = self._client._step_request(self.id, layer, self.rows, q, k, v, open_, free, self.want_lse)
        pending = self._stream.send(request, q, len(self.rows))
        if deltas:
            pending.on_success = self._deltas_applied
        return pending

    def _deltas_applied(self, result: StepResult) -> None:
        if self._on_deltas_applied is not None:
            self._on_deltas_applied(self.open, self.free)
            self._on_deltas_applied = None

    def step(self, layer: int, q: Any, k: Any, v: Any) -> Any:
        """Runs `layer` and returns its attention output (the full result stays in `last`)."""
        self.last = self.send(layer, q, k, v).result()
        return self.last.out


class MicroBatch:
    """Sequences decoded together, one token step after another.

    Sequences join with `add` (a prompt written by write_prompt) or `open` (a new, empty
    sequence, opened by the next token step's layer 0) and leave with `finish` (freed by the next
    token step's layer 0, or by `close`). `token_step()` starts the next token step over the
    current rows, in the order they joined.
    """

    def __init__(self, client: Client, *, stream: StepStream | None = None, want_lse: bool = False) -> None:
        self._client = client
        self._stream = stream
        self._want_lse = want_lse
        self.rows: list[int] = []
        self._open: list[int] = []
        self._free: list[int] = []

    def add(self, sequence_id: int) -> None:
        """A steppable sequence (its prompt written) joins from the next token step on."""
        self.rows.append(sequence_id)

    def open(self, sequence_id: int) -> None:
        """A new, empty sequence joins; the next token step opens it."""
        self._open.append(sequence_id)
        self.rows.append(sequence_id)

    def finish(self, sequence_id: int) -> None:
        """A sequence leaves; the next token step (or close) frees it on the worker."""
        self.rows.remove(sequence_id)
        if sequence_id in self._open:  # never opened on the worker
            self._open.remove(sequence_id)
        else:
            self._free.append(sequence_id)

    def token_step(self) -> TokenStep:
        """The next token step over the current rows, carrying the pending open/free deltas (they
        count as applied once its layer 0 succeeded; a failed layer 0 changes nothing)."""
        return TokenStep(self._client, self.rows, token_step_id=self._client.next_token_step_id(),
                         open=self._open, free=self._free, want_lse=self._want_lse,
                         stream=self._stream, on_deltas_applied=self._deltas_applied)

    def _deltas_applied(self, opened: list[int], freed: list[int]) -> None:
        self._open = [s for s in self._open if s not in opened]
        self._free = [s for s in self._free if s not in freed]

    def close(self, *, release_rows: bool = True) -> None:
        """Frees finished sequences that no token step carried, and (by default) every row."""
        ids = self._free + (self.rows if release_rows else [])
        self._free = []
        if release_rows:
            self.rows = []
        if ids:
            self._client.release(ids)
