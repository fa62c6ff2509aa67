"""Runner: a whole step on the meta device (no layer reads a device value on the host), and the cache
seam for kinds other than MLA's latent: a fixed per-sequence window and a compressed paged cache,
driven through the engine with chunked prefill and preemption."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BASE
from moela.config import ModelConfig
from moela.engine.config import EngineConfig
from moela.engine.cache import BlockManager, CacheLayout
from moela.engine.llm import LLMEngine
from moela.engine.runner import Runner
from moela.engine.sampler import SamplingParams
from moela.engine.sequence import Sequence
from moela.models import CacheSpec, build_model


def test_a_mixed_step_runs_on_the_meta_device():
    """Meta tensors have no values: any .item(), .tolist(), data-dependent shape or CPU tensor mixed into
    the step would raise. A fresh prompt, a chunk after a cached prefix and two decodes share the step.
    bf16: off the CPU, torch's grouped matmul (the reference MoE) takes bf16 only."""
    cfg = ModelConfig.from_dict(dict(BASE, model_type="deepseek_v3", n_group=4, topk_group=2))
    model = build_model(cfg, torch.bfloat16, "meta")
    runner = Runner(model, CacheLayout(model.cache_specs(), torch.bfloat16, 4), num_blocks=32)
    blocks = BlockManager(32, 4, enable_prefix_caching=False)
    batch = []
    for length, computed in ((7, 0), (11, 8), (6, 5), (9, 8)):
        seq = Sequence("r", 0, list(range(2, 2 + length)), length, SamplingParams(), None, None, num_computed=computed)
        assert blocks.ensure(seq, length)
        batch.append((seq, length - computed))
    logits, every = runner.execute(batch, all_rows={0})
    assert logits.device.type == "meta" and logits.shape == (4, cfg.vocab_size) and every[0].shape == (7, cfg.vocab_size)


V, W = 64, 3  # vocabulary and window of the model below


class WindowModel(nn.Module):
    naive_prefill = False
    """A weightless model whose next token is (sum of the last W tokens + sum of every complete pair of
    tokens so far) % V: the window lives in a fixed per-sequence cache, each pair's sum in a paged cache
    with one entry per 2 tokens. Any mix-up of slots, blocks or positions changes its output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.embed = cfg, nn.Embedding(V, 1)
        self.window = self.pairs = None

    def cache_specs(self) -> list[list[CacheSpec]]:
        return [[CacheSpec("window", "window", 1, entries_per_sequence=W), CacheSpec("pairs", "pair sums", 1, tokens_per_entry=2)]]

    def attach_cache(self, caches) -> None:
        self.window, self.pairs = (None, None) if caches is None else (caches[0]["window"], caches[0]["pairs"])

    def pair_row(self, table: list[int], entry: int) -> tuple[int, int]:
        per_block = self.pairs.shape[1]  # entries per block
        return table[entry // per_block], entry % per_block

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        toks, pos, out = tokens.tolist(), positions.tolist(), []
        for b in range(len(ctx.q_lens)):
            slot, table = int(ctx.seq_slots[b]), ctx.block_tables[b].tolist()
            for i in range(ctx.q_starts[b], ctx.q_starts[b + 1]):
                p = pos[i]
                self.window[slot, p % W, 0] = toks[i]
                if p % 2:
                    self.pairs[self.pair_row(table, p // 2)][0] = self.window[slot, (p - 1) % W, 0] + toks[i]
                window = sum(int(self.window[slot, q % W, 0]) for q in range(max(0, p - W + 1), p + 1))
                pairs = sum(int(self.pairs[self.pair_row(table, e)][0]) for e in range((p + 1) // 2))
                out.append((window + pairs) % V)
        return torch.tensor(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.one_hot(hidden, V).float() * 10


def expected(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        p = len(seq) - 1
        seq.append((sum(seq[max(0, p - W + 1) : p + 1]) + sum(seq[: 2 * ((p + 1) // 2)])) % V)
    return seq[len(prompt) :]


def test_fixed_and_compressed_cache_kinds_through_the_engine():
    cfg = ModelConfig.from_dict(dict(BASE, model_type="deepseek_v3", n_group=4, topk_group=2, vocab_size=V))
    layout = CacheLayout(WindowModel(cfg).cache_specs(), torch.float32, 4)
    assert (layout.bytes_per_token, layout.fixed_bytes_per_sequence, layout.bytes_per_block) == (2, 12, 8)
    budget = 4 * 12 + 10 * 8  # 4 slots, 10 blocks (40 tokens) for 4 sequences of up to 20 tokens: preemption
    engine = LLMEngine(EngineConfig(dtype="float32", skip_tokenizer_init=True, block_size=4, max_num_seqs=4,
                                    max_num_batched_tokens=10, kv_cache_memory=budget), model=WindowModel(cfg))
    assert engine.blocks.num_blocks == 10 and engine.blocks.num_slots == 4 and not engine.blocks.prefix_caching
    assert engine.runner.caches[0]["window"].shape == (4, W, 1) and engine.runner.caches[0]["pairs"].shape == (10, 2, 1)
    prompts = [[5, 9, 1, 7, 3, 2, 8], [4, 4], [10, 20, 30, 40, 50, 60, 1, 2, 3], [63, 1, 62]]
    params = SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.scheduler.num_preemptions > 0
    for prompt, rid in zip(prompts, ids):
        assert done[rid].outputs[0].token_ids == expected(prompt, 11)
    assert engine.blocks.num_free == 10 and len(engine.blocks.free_slots) == 4


def test_block_size_must_hold_whole_compressed_entries():
    with pytest.raises(ValueError, match="block_size = 6 is invalid for this model: its 'pair sums' cache keeps one "
                                         "entry per 4 tokens"):
        CacheLayout([[CacheSpec("pairs", "pair sums", 1, tokens_per_entry=4)]], torch.float32, 6)
