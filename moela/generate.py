"""Batch generation on the paged latent cache: prefill, then absorbed-MLA decode one token a step.

    dec = BatchDecoder(model, n_seqs=2, max_len=128)
    logits = dec.step([prompt_a, prompt_b])     # prefill: logits of each sequence's last token
    logits = dec.step([[tok_a], [tok_b]])       # decode: one new token each
    outputs = generate(model, [prompt_a, prompt_b], SamplingParams(temperature=0), eos_ids=(1,))

Each sequence owns a fixed run of cache blocks here; the engine (continuous batching, prefix
sharing, preemption) hands out blocks from a shared pool instead, through the same StepContext.
"""

import math
from collections.abc import Callable

import torch

from moela.model import StepContext, Transformer
from moela.sampling import SamplingParams, sample_one


def allocate_cache(model: Transformer, num_blocks: int, block_size: int) -> list[torch.Tensor]:
    """One latent cache per layer: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
    cfg, dtype = model.cfg, model.embed.weight.dtype
    return [torch.zeros(num_blocks, block_size, cfg.latent_dim, dtype=dtype, device=model.embed.weight.device)
            for _ in range(cfg.num_hidden_layers)]


class BatchDecoder:
    def __init__(self, model: Transformer, n_seqs: int, max_len: int, block_size: int = 64):
        self.model, self.block_size = model, block_size
        blocks_per_seq = math.ceil(max_len / block_size)
        self.caches = allocate_cache(model, n_seqs * blocks_per_seq, block_size)
        self.block_tables = torch.arange(n_seqs * blocks_per_seq).view(n_seqs, blocks_per_seq)
        self.lens = [0] * n_seqs
        self.max_len = blocks_per_seq * block_size

    @torch.inference_mode()
    def step(self, new_tokens: list[list[int]], seqs: list[int] | None = None, naive_prefill: bool = True) -> torch.Tensor:
        """Append new_tokens[j] to sequence seqs[j] (default: all); return [len(seqs), vocab] last-token logits."""
        seqs = list(range(len(self.lens))) if seqs is None else seqs
        positions, slots = [], []
        for i, toks in zip(seqs, new_tokens):
            if self.lens[i] + len(toks) > self.max_len:
                raise ValueError(f"sequence {i} would exceed the {self.max_len}-token cache")
            pos = torch.arange(self.lens[i], self.lens[i] + len(toks))
            positions.append(pos)
            slots.append(self.block_tables[i][pos // self.block_size] * self.block_size + pos % self.block_size)
            self.lens[i] += len(toks)
        ctx = StepContext(positions=torch.cat(positions), q_lens=[len(t) for t in new_tokens],
                          kv_lens=[self.lens[i] for i in seqs], slot_mapping=torch.cat(slots),
                          block_tables=self.block_tables[seqs], naive_prefill=naive_prefill)
        tokens = torch.tensor([t for toks in new_tokens for t in toks], dtype=torch.long)
        self.model.attach_cache(self.caches)
        try:
            hidden = self.model(tokens, ctx.positions, ctx)
        finally:
            self.model.attach_cache(None)
        last = torch.tensor(ctx.q_starts[1:]) - 1
        return self.model.logits(hidden[last]).float()


def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_ids: tuple[int, ...] = (),
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Generate up to params.max_tokens for each prompt; on_token(seq, token) is called as tokens appear."""
    dec = BatchDecoder(model, len(prompts), max(len(p) for p in prompts) + params.max_tokens)
    generators = [params.generator() for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active, new = list(range(len(prompts))), [list(p) for p in prompts]
    while active:
        logits = dec.step(new, active)
        still, new = [], []
        for row, i in enumerate(active):
            token = sample_one(logits[row], params, generators[i])
            outputs[i].append(token)
            if on_token:
                on_token(i, token)
            if len(outputs[i]) < params.max_tokens and (params.ignore_eos or token not in eos_ids):
                still.append(i)
                new.append([token])
        active = still
    return outputs
