"""What the worker reports: Describe, step results and releases, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelShape", "PoolInfo", "Limits", "OpenTokenStep", "WorkerInfo", "StepResult",
           "PromptResult", "ReleaseResult"]


@dataclass(frozen=True)
class ModelShape:
    """The attention shape the worker serves (the same for every layer)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str  # "float16" or "bfloat16": q, k, v and out travel in it

    def q_shape(self, batch: int) -> tuple[int, int, int]:
        """[B, Hq, d] of a layer's q and out."""
        return (batch, self.num_q_heads, self.head_dim)

    def kv_shape(self, tokens: int) -> tuple[int, int, int]:
        """[n, Hkv, d] of a layer's k or v for n rows or n prompt tokens."""
        return (tokens, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class PoolInfo:
    """KV pool occupancy at the time of the Describe."""

    total_pages: int
    free_pages: int
    used_pages: int
    page_bytes: int
    num_sequences: int
    reserved_tokens: int
    used_tokens: int


@dataclass(frozen=True)
class Limits:
    """Request limits of the worker (see Limits in worker.proto)."""

    max_batch: int
    max_message_bytes: int
    max_open_token_steps: int
    retry_window_token_steps: int
    max_prompt_tokens: int
    max_sequences: int
    max_open_per_step: int
    max_free_per_step: int
    token_step_idle_seconds: float
    prompt_idle_seconds: float
    sequence_idle_seconds: float
    check_finite: bool


@dataclass(frozen=True)
class OpenTokenStep:
    """A token step with layers still to run."""

    token_step_id: int
    router: str
    rows: int
    layers_done: int
    idle_seconds: float


@dataclass(frozen=True)
class WorkerInfo:
    """The answer to Describe."""

    model: ModelShape
    pool: PoolInfo
    backend: str
    device: str
    limits: Limits
    active_sequences: int
    writing_sequences: int
    open_token_steps: int
    serving: bool
    incarnation: int
    router: str
    open_steps: tuple[OpenTokenStep, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class StepResult:
    """One answered layer of a token step. `out` is [B, Hq, d] in the kind of the query."""

    token_step_id: int
    layer: int
    out: Any
    lse: Any  # [B, Hq] float32 when asked for, else None
    kernel: str
    replayed: bool  # served from the worker's retry cache (nothing appended)
    attempts: int  # sends of this layer, retries included
    attend_seconds: float  # the attention's device time; 0 where attention_timed is False
    attention_timed: bool  # the worker measured attend_seconds on this layer-step (it samples on CUDA)
    server_seconds: float
    queue_seconds: float
    round_trip_seconds: float  # this client's send to receive, retries included
    incarnation: int


@dataclass(frozen=True)
class PromptResult:
    """A prompt that WriteKV made steppable."""

    sequence_id: int
    num_tokens: int
    bytes_written: int
    num_chunks: int
    incarnation: int


@dataclass(frozen=True)
class ReleaseResult:
    released: int
    free_pages: int
    incarnation: int
