"""The worker's decode attention computed in this process: the test oracle of the model tests.

LocalAttention keeps every sequence's K,V history per layer and answers a layer of a token step
as worker.proto defines it (append the row's new k, v; softmax(q.k / sqrt(d)) over the history
plus the new token; grouped-query heads h -> h / (Hq / Hkv)). With `wire_dtype` set, q, k, v and
the output are rounded to that dtype the way the wire and the worker round them, and the sum runs
in double precision, so the only difference left to the worker is its fp32 accumulation.
"""

from __future__ import annotations

import torch


class LocalAttention:
    def __init__(self, num_layers: int, wire_dtype: torch.dtype | None = None) -> None:
        self.num_layers = num_layers
        self.wire_dtype = wire_dtype
        self.k: dict[int, list[torch.Tensor]] = {}  # seq -> per layer [T, Hkv, d] float64
        self.v: dict[int, list[torch.Tensor]] = {}

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        if self.wire_dtype is not None:
            x = x.to(self.wire_dtype)
        return x.to(torch.float64)

    def write_prompt(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [layers, T, Hkv, d]."""
        self.k[seq] = [self._round(k[layer]) for layer in range(self.num_layers)]
        self.v[seq] = [self._round(v[layer]) for layer in range(self.num_layers)]

    def open(self, seq: int, num_kv_heads: int, head_dim: int) -> None:
        empty = torch.zeros(0, num_kv_heads, head_dim, dtype=torch.float64)
        self.k[seq] = [empty] * self.num_layers
        self.v[seq] = [empty] * self.num_layers

    def free(self, seq: int) -> None:
        del self.k[seq], self.v[seq]

    def step(self, rows: list[int], layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, d], k, v [B, Hkv, d] -> out [B, Hq, d] (in the wire dtype when set)."""
        q64, k64, v64 = self._round(q), self._round(k), self._round(v)
        hq, d = q.shape[1], q.shape[2]
        outs = []
        for i, seq in enumerate(rows):
            self.k[seq][layer] = torch.cat([self.k[seq][layer], k64[i:i + 1]])
            self.v[seq][layer] = torch.cat([self.v[seq][layer], v64[i:i + 1]])
            keys, values = self.k[seq][layer], self.v[seq][layer]  # [T, Hkv, d]
            group = hq // keys.shape[1]
            keys = keys.repeat_interleave(group, dim=1)  # [T, Hq, d]
            values = values.repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,thd->ht", q64[i], keys) / d ** 0.5
            outs.append(torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), values))
        out = torch.stack(outs)
        return out.to(self.wire_dtype) if self.wire_dtype is not None else out.to(q.dtype)
