"""A Llama model decoding through a real pkv-worker (CPU backend, fp16 KV).

transformers' LlamaForCausalLM (RoPE, GQA, RMSNorm, SwiGLU) with a small seeded configuration:
4 layers, hidden 512, Hq 8, Hkv 2, head_dim 64, vocabulary 512. Embeddings, norms, projections,
RoPE, the MLP and the LM head run here; attention runs in the worker at every layer (prompt K,V
written with WriteKV, then q/k/v per layer per token step). Four prompts (7..50 tokens, across
page boundaries), 40 worker decode steps each, in three configurations: batch 1 over unary Step,
batch 4 over a StepStream, and two micro-batches of two in flight on one StepStream (one row
opened empty with `open` and fed its prompt token by token, rows leaving with `free` deltas).

The reference is the model's own greedy `generate` in fp32. The worker takes q, k, v in fp16, so
its logits differ from fp32 by the rounding (measured up to ~9e-3, logits' std ~1.1), and a step
where generate's two best tokens are closer than that is a near tie the rounding may swap. So:
  * teacher-forced (generate's tokens fed back): logits within LOGITS_VS_FP32 of generate's at
    every step, and the same argmax at every step that is not a near tie;
  * free-running greedy: the same tokens as generate up to its first near tie, at least MIN_EQUAL
    on all prompts but one, and exactly the tokens of the same loop with attention computed here
    on the same fp16-rounded q, k, v and output (local_attention.py), logits within
    LOGITS_VS_WIRE (what is left is the worker's fp32 accumulation);
  * the same loop with fp32 attention computed here reproduces generate within LOGITS_LOOP: the
    router-side layer code is the model's own arithmetic.
Set PKV_LLAMA_VERBOSE=1 to print the measured differences.
"""

from __future__ import annotations

import os
import sys
import unittest

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from local_attention import LocalAttention
from persistentkv import Client, shared_memory
from persistentkv.llama import LlamaDecoder, run_micro_batches, run_token_step
from worker_process import WorkerProcess

SEED = 20260701
STEPS = 40  # worker decode steps per sequence (the first token comes from the model's prefill)
MIN_EQUAL = 33  # free-running tokens equal to generate: the prefill's and 32 worker steps'
PROMPT_LENGTHS = (7, 19, 33, 50)  # across 16-token page boundaries
# Max |logit difference| allowed. The logits' standard deviation is about 1.1.
LOGITS_LOOP = 1e-4     # decode loop with local fp32 attention vs generate (measured ~1e-5)
LOGITS_VS_WIRE = 2e-3  # worker vs local attention on the same fp16-rounded tensors
LOGITS_VS_FP32 = 2e-2  # worker (fp16 on the wire) vs generate in fp32 (measured ~7e-3)
VERBOSE = os.environ.get("PKV_LLAMA_VERBOSE") == "1"


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.05,
                         attn_implementation="eager", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # greedy decode runs its full length
    return model


class Row:
    """One sequence of the decode loop."""

    def __init__(self, seq: int, prompt: list[int], written: bool, prefill_logits: torch.Tensor | None,
                 forced: list[int] | None = None) -> None:
        self.seq = seq
        self.prompt = prompt
        self.forced = forced  # teacher forcing: the tokens fed back (generate's), not our argmax
        self.to_feed = [] if written else list(prompt)  # prompt tokens still to send as token steps
        self.length = len(prompt) if written else 0     # tokens the worker holds
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] = []
        if prefill_logits is not None:
            self.take(prefill_logits)

    def take(self, logits: torch.Tensor) -> None:
        self.logits.append(logits)
        self.tokens.append(int(logits.argmax()))

    def next_input(self) -> int:
        if self.to_feed:
            return self.to_feed.pop(0)
        return self.forced[len(self.tokens) - 1] if self.forced else self.tokens[-1]

    def done(self) -> bool:
        return len(self.tokens) == STEPS + 1


class LlamaThroughWorkerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        torch.set_num_threads(1)
        cls.model = make_model()
        cls.decoder = LlamaDecoder(cls.model)
        g = torch.Generator().manual_seed(SEED + 1)
        cls.prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
        cls.reference = [cls.generate(p) for p in cls.prompts]
        cls.worker = WorkerProcess(num_layers=4, num_q_heads=8, num_kv_heads=2, head_dim=64,
                                   page_size=16, dtype="fp16", num_pages=512)
        cls.client = Client(cls.worker.target, router_id="llama-test")
        cls.decoder.check_worker(cls.client)
        cls.next_seq = 1000
        cls.results = []

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()
        cls.worker.stop()

    @classmethod
    def generate(cls, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
        """The model's own greedy decode: STEPS + 1 tokens and their logits."""
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = cls.model.generate(ids, max_new_tokens=STEPS + 1, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0)
        return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0]

    def new_seq(self) -> int:
        type(self).next_seq += 1
        return self.next_seq

    # -- decode loops ---------------------------------------------------------------------------

    def local_decode(self, prompt: list[int], wire_dtype: torch.dtype | None, written: bool = True) -> Row:
        """Batch-1 greedy decode with attention computed here (the oracle), the prompt written
        from the model's prefill or fed token by token like worker_decode does."""
        attention = LocalAttention(4, wire_dtype)
        if written:
            k, v, logits = self.decoder.prompt_kv(prompt)
            attention.write_prompt(1, k, v)
            row = Row(1, prompt, True, logits)
        else:
            attention.open(1, 2, 64)
            row = Row(1, prompt, False, None)
        while not row.done():
            gen = self.decoder.decode_layers([row.next_input()], [row.length])
            try:
                args = next(gen)
                while True:
                    args = gen.send(attention.step([1], *args))
            except StopIteration as finished:
                row.length += 1
                if not row.to_feed:
                    row.take(finished.value[0])
        return row

    def worker_decode(self, groups: list[list[tuple[int, bool]]], *, use_stream: bool | str,
                      forced: bool = False) -> list[list[Row]]:
        """Decodes micro-batches of (prompt index, written) through the worker until every row has
        STEPS + 1 tokens. Written rows are prefilled by the model and their K,V sent with WriteKV;
        the others are opened empty and fed their prompt one token step per token. `forced`: feed
        generate's tokens back instead of the worker's argmax (teacher forcing). `use_stream`:
        False (unary Step), True (a StepStream) or "ring" (a StepStream through shared memory)."""
        if use_stream == "ring":
            stream = self.client.step_stream(shared_memory_ring=True)
        else:
            stream = self.client.step_stream() if use_stream else None
        batches, rows = [], []
        for group in groups:
            batch = self.client.micro_batch(stream=stream)
            members = []
            for index, written in group:
                seq, prompt = self.new_seq(), self.prompts[index]
                teacher = self.reference[index][0] if forced else None
                if written:
                    members.append(Row(seq, prompt, True, self.decoder.prefill(self.client, seq, prompt), teacher))
                    batch.add(seq)
                else:
                    members.append(Row(seq, prompt, False, None, teacher))
                    batch.open(seq)
            batches.append(batch)
            rows.append(members)
        live = [list(m) for m in rows]
        while any(live):
            work, order = [], []
            for batch, members in zip(batches, live):
                if not members:
                    continue
                self.assertEqual(batch.rows, [r.seq for r in members])
                gen = self.decoder.decode_layers([r.next_input() for r in members], [r.length for r in members])
                work.append((gen, batch.token_step()))
                order.append((batch, members))
            if use_stream:
                all_logits = run_micro_batches(work)
            else:
                all_logits = [run_token_step(gen, step) for gen, step in work]
            for (batch, members), logits in zip(order, all_logits):
                for i, row in enumerate(list(members)):
                    row.length += 1
                    if not row.to_feed:
                        row.take(logits[i])
                    if row.done():
                        batch.finish(row.seq)  # freed by the next token step's layer 0, or close()
                        members.remove(row)
        for batch in batches:
            batch.close()
        if stream is not None:
            stream.close()
        return rows

    # -- checks -----------------------------------------------------------------------------------

    def check_config(self, groups: list[list[tuple[int, bool]]], *, use_stream: bool | str, what: str) -> None:
        """Decodes `groups` through the worker twice and checks every row:
          teacher-forced (generate's tokens fed back): at each of the STEPS + 1 positions the
            logits are within LOGITS_VS_FP32 of generate's, and the argmax is generate's token
            wherever generate's top-2 margin is more than twice the logit error measured there
            (a smaller margin is a near tie that the fp16 rounding may swap);
          free-running greedy: the tokens are generate's up to its first such near tie, on all
            but one prompt for at least MIN_EQUAL tokens, and all STEPS + 1 are those of the local
            oracle on the same fp16-rounded tensors, whose logits are within LOGITS_VS_WIRE.
        """
        forced_rows = [r for m in self.worker_decode(groups, use_stream=use_stream, forced=True) for r in m]
        free_rows = [r for m in self.worker_decode(groups, use_stream=use_stream) for r in m]
        indices = [index for group in groups for index, _ in group]
        written = {index: w for group in groups for index, w in group}
        for index, forced, free in zip(indices, forced_rows, free_rows):
            ref_tokens, ref_logits = self.reference[index]
            errors = (torch.stack(forced.logits) - ref_logits).abs().max(dim=-1).values  # per step
            top2 = ref_logits.topk(2, dim=-1).values
            margins = top2[:, 0] - top2[:, 1]
            near_tie = margins <= 2 * errors
            label = f"{what}, prompt {index} ({len(forced.prompt)} tokens)"
            self.assertLessEqual(float(errors.max()), LOGITS_VS_FP32, f"{label}: teacher-forced logits vs generate")
            for t, (token, ref) in enumerate(zip(forced.tokens, ref_tokens)):
                if not near_tie[t]:
                    self.assertEqual(token, ref, f"{label}: teacher-forced step {t}: margin {float(margins[t]):.5f}, "
                                                 f"logit error {float(errors[t]):.5f}")
            first_tie = int(near_tie.nonzero()[0]) if bool(near_tie.any()) else STEPS + 1
            equal = next((t for t, (a, b) in enumerate(zip(free.tokens, ref_tokens)) if a != b), STEPS + 1)
            self.assertGreaterEqual(equal, first_tie, f"{label}: free-running tokens {free.tokens} vs generate "
                                                      f"{ref_tokens} differ before generate's first near tie")
            oracle = self.local_decode(self.prompts[index], torch.float16, written[index])
            self.assertEqual(free.tokens, oracle.tokens, f"{label}: free-running tokens vs the fp16-wire oracle")
            wire_error = float((torch.stack(free.logits) - torch.stack(oracle.logits)).abs().max())
            self.assertLessEqual(wire_error, LOGITS_VS_WIRE, f"{label}: logits vs the fp16-wire oracle")
            self.results.append((what, index, equal, first_tie, int(near_tie.sum()), float(errors.max()), wire_error))
            if VERBOSE:
                print(f"{label}: free-running tokens equal to generate: {equal}/{STEPS + 1} (first near tie at "
                      f"{first_tie}, {int(near_tie.sum())} near ties); max |logit diff| vs generate "
                      f"{float(errors.max()):.3g} (teacher-forced), vs fp16-wire oracle {wire_error:.3g}",
                      file=sys.stderr)
        long_runs = sum(1 for r in self.results[-len(indices):] if r[2] >= MIN_EQUAL)
        self.assertGreaterEqual(long_runs, len(indices) - 1, f"{what}: prompts with {MIN_EQUAL} tokens equal")
        self.assertGreaterEqual(len(set(self.reference[0][0])), 16, "the seeded model should not repeat itself")

    def test_decode_loop_is_the_model(self) -> None:
        """The router-side layer code with fp32 attention reproduces generate."""
        for index, prompt in enumerate(self.prompts):
            row = self.local_decode(prompt, None)
            ref_tokens, ref_logits = self.reference[index]
            self.assertEqual(row.tokens, ref_tokens)
            self.assertLessEqual(float((torch.stack(row.logits) - ref_logits).abs().max()), LOGITS_LOOP)

    def test_batch1_unary_steps(self) -> None:
        for index in range(len(self.prompts)):
            self.check_config([[(index, True)]], use_stream=False, what="B=1 unary")

    def test_batch4_on_a_stream(self) -> None:
        self.check_config([[(i, True) for i in range(len(self.prompts))]], use_stream=True, what="B=4 stream")

    def test_two_micro_batches_with_open_and_free(self) -> None:
        self.check_config([[(0, True), (3, False)], [(2, True), (1, True)]], use_stream=True,
                          what="2 micro-batches x B=2 stream")
        info = self.client.describe()
        self.assertEqual(info.pool.used_pages, 0, "every sequence was freed")
        self.assertEqual(info.open_token_steps, 0)

    @unittest.skipUnless(shared_memory.supported(), "the shared-memory ring needs Linux on x86-64")
    def test_two_micro_batches_through_the_shared_memory_ring(self) -> None:
        self.check_config([[(0, True), (3, False)], [(2, True), (1, True)]], use_stream="ring",
                          what="2 micro-batches x B=2 ring")
        info = self.client.describe()
        self.assertEqual(info.pool.used_pages, 0, "every sequence was freed")
        self.assertEqual(info.open_token_steps, 0)


if __name__ == "__main__":
    unittest.main()
