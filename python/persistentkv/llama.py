"""A transformers Llama model (LlamaForCausalLM) whose decode attention runs in the worker.

The router process keeps everything but attention: embeddings, RMSNorms, the q/k/v/o
projections, RoPE, the SwiGLU MLP and the LM head run here on the model's own modules and
weights. A prompt is prefilled by the model itself; its K,V after RoPE go to the worker with
WriteKV. Every decode token step then sends, per layer, the new token's q, k, v (after RoPE) and
feeds the worker's attention output back into the layer's o_proj.

    decoder = LlamaDecoder(model)
    logits = decoder.prefill(client, seq, prompt_ids)        # next-token logits [vocab]
    gen = decoder.decode_layers(tokens, positions)           # one token step, layer by layer
    logits = run_token_step(gen, batch.token_step())          # [B, vocab]

`decode_layers` is a generator: it yields (layer, q, k, v) and takes the attention output back,
so that several micro-batches can be interleaved on one StepStream (run_micro_batches): while
the worker attends one micro-batch's layer, the router computes the next one's.

Needs torch and transformers (pip install "persistentkv[llama]").
"""

from __future__ import annotations

import time
from typing import Any, Generator, Sequence

import torch

from persistentkv.client import Client, TokenStep

__all__ = ["LlamaDecoder", "run_token_step", "run_micro_batches"]

# (layer, q [B, Hq, d], k [B, Hkv, d], v [B, Hkv, d]) out, attention output [B, Hq, d].
LayerGen = Generator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]


def _cached_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [1, Hkv, T, d] of one layer of a transformers cache (per-layer objects in newer
    releases, (k, v) pairs by index in older ones)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and hasattr(layers[layer], "keys"):
        return layers[layer].keys, layers[layer].values
    return cache[layer][0], cache[layer][1]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoder:
    """Decode of a LlamaForCausalLM with attention outside the model (see the module comment)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device = model.get_input_embeddings().weight.device  # token ids go where the model is

    def check_worker(self, client: Client) -> None:
        """Raises ValueError when the worker serves another attention shape than the model's."""
        s = client.shape
        want = (self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim)
        have = (s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim)
        if want != have:
            raise ValueError(f"the model needs (layers, Hq, Hkv, d) = {want}, the worker serves {have}")

    @torch.no_grad()
    def prompt_kv(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefills one prompt with the model itself: (K, V) [layers, T, Hkv, d] after RoPE, and
        the logits [vocab] of the token after the prompt."""
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device).unsqueeze(0)
        out = self.model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        ks, vs = [], []
        for layer in range(self.num_layers):
            k, v = _cached_kv(cache, layer)  # [1, Hkv, T, d]
            ks.append(k[0].transpose(0, 1))
            vs.append(v[0].transpose(0, 1))
        return torch.stack(ks), torch.stack(vs), out.logits[0, -1]

    def prefill(self, client: Client, sequence_id: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Prefills a prompt, writes its K,V to the worker as `sequence_id`; returns next-token logits."""
        k, v, logits = self.prompt_kv(prompt_ids)
        client.write_prompt(sequence_id, k, v)
        return logits

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, d] of the rotary embedding at `positions` [B]."""
        cos, sin = self.model.model.rotary_emb(x, positions.unsqueeze(1))  # [B, 1, d]
        return cos, sin

    @torch.no_grad()
    def decode_layers(self, tokens: Sequence[int] | torch.Tensor,
                      positions: Sequence[int] | torch.Tensor) -> LayerGen:
        """One token step for a batch: `tokens` [B] at `positions` [B] (each row's length before
        the token). Yields (layer, q, k, v) per layer, takes the attention output [B, Hq, d] back;
        returns the next-token logits [B, vocab]."""
        m = self.model.model
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        positions = torch.as_tensor(positions, dtype=torch.long, device=self.device)
        b, hq, hkv, d = tokens.shape[0], self.num_q_heads, self.num_kv_heads, self.head_dim
        h = m.embed_tokens(tokens)  # [B, hidden]
        cos, sin = self._rope(h, positions)
        cos, sin = cos[:, 0].unsqueeze(1), sin[:, 0].unsqueeze(1)  # [B, 1, d]: broadcast over heads
        for index, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, hq, d)
            k = attn.k_proj(x).view(b, hkv, d)
            v = attn.v_proj(x).view(b, hkv, d)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = yield index, q, k, v
            h = h + attn.o_proj(out.reshape(b, hq * d).to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h))


def run_token_step(layers: LayerGen, token_step: TokenStep) -> torch.Tensor:
    """Drives one decoder token step through a worker token step; returns the logits."""
    try:
        layer, q, k, v = next(layers)
        while True:
            out = token_step.step(layer, q, k, v)
            layer, q, k, v = layers.send(out)
    except StopIteration as done:
        return done.value


def run_micro_batches(work: Sequence[tuple[LayerGen, TokenStep]],
                      stats: dict[str, float] | None = None) -> list[torch.Tensor]:
    """Drives several micro-batches' token steps at once (each TokenStep on a StepStream): layer
    l of every micro-batch is sent before any answer is awaited, and a micro-batch's next layer is
    computed as soon as its answer is back. Returns each micro-batch's logits. With `stats`, adds
    the seconds spent waiting for the worker's answers to stats["worker_wait_s"] and those spent
    computing the model's own layers here to stats["model_s"]."""
    clock = time.perf_counter
    wait_s = model_s = 0.0
    t = clock()
    pending: list[Any] = []
    for layers, step in work:
        pending.append(step.send(*next(layers)))
    model_s += clock() - t
    logits: list[Any] = [None] * len(work)
    while any(p is not None for p in pending):
        for i, (layers, step) in enumerate(work):
            if pending[i] is None:
                continue
            t = clock()
            out = pending[i].result().out
            wait_s += clock() - t
            t = clock()
            try:
                pending[i] = step.send(*layers.send(out))
            except StopIteration as done:
                logits[i] = done.value
                pending[i] = None
            model_s += clock() - t
    if stats is not None:
        stats["worker_wait_s"] = stats.get("worker_wait_s", 0.0) + wait_s
        stats["model_s"] = stats.get("model_s", 0.0) + model_s
    return logits
