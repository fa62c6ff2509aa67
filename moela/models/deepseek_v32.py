"""DeepSeek-V3.2 (DSA, DeepSeek Sparse Attention): V3 whose attention layers each gain a lightning
indexer that picks, for every query, the `index_topk` past tokens worth attending. Math only.

    model = build_model(cfg)        # moela.models, cfg.model_type == "deepseek_v32"

The indexer scores a query against every cached indexer key (128 values per token per layer, a cache
kind of its own) with sum_h w_h * relu(q_h . k / sqrt(D)) in fp32, and the attention then reads only
the picked latent rows: a decode step's attention grows with index_topk, not with the context. For
contexts up to index_topk the picks are every visible token and DSA equals V3's dense attention.
The rest (MoE, router, MLA projections, YaRN) is V3's, reused from deepseek.py.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moela.config import ModelConfig
from moela.models import deepseek
from moela.models.context import CacheSpec, StepContext
from moela.models.layers import Linear, OpsModule


class Indexer(OpsModule):
    """Scores past tokens for each query; its keys are cached per token (CacheSpec kind "indexer")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ix = cfg.indexer
        self.n_heads, self.head_dim, self.topk, self.rope_dim = ix.n_heads, ix.head_dim, ix.topk, cfg.qk_rope_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, ix.n_heads * ix.head_dim)
        self.wk = Linear(cfg.hidden_size, ix.head_dim)
        self.k_norm = nn.LayerNorm(ix.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, ix.n_heads, sliced=True)  # read directly, applied in fp32
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, head_dim], set by the engine

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first rope_dim values, pairs (i, i + r/2) (not interleaved, unlike MLA's)."""
        return torch.cat([self.ops.rope(x[..., : self.rope_dim], cos, sin, False), x[..., self.rope_dim :]], dim=-1)

    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: StepContext) -> torch.Tensor:
        """Positions [T, index_topk] each query attends (-1 where it has fewer past tokens)."""
        q = self.rope(self.wq_b(q_resid).view(x.shape[0], self.n_heads, self.head_dim), cos, sin)  # [T, H, D]
        k = self.rope(self.k_norm(self.wk(x)), cos, sin)  # [T, D]
        if self.k_cache is not None:
            self.ops.store_latent(self.k_cache, ctx.slot_mapping, k)
        weights = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads**-0.5  # [T, H]
        return self.ops.indexer_topk(q, weights, self.k_cache, k, ctx, self.topk, self.head_dim**-0.5)


class DSA(deepseek.MLA):
    """MLA that attends only the latent rows its indexer picks (absorbed form, gathered rows)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.indexer = Indexer(cfg)

    def cache_specs(self) -> list[CacheSpec]:
        return super().cache_specs() + [CacheSpec("indexer.k_cache", "indexer", self.indexer.head_dim)]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        q_nope, q_pe, latent, q_resid = self.project(x, cos, sin, ctx)
        picks = self.indexer(x, q_resid, cos, sin, ctx)  # [T, index_topk]
        o = self.ops.sparse_latent_attention(self.absorb_query(q_nope, q_pe), self.kv_cache, latent, picks, ctx,
                                             self.softmax_scale, self.kv_lora_rank)  # [T, h, c]
        return self.wo(self.absorb_output(o).flatten(1))


class Transformer(deepseek.Transformer):
    attention = DSA
    naive_prefill = False  # every query reads the cache: its picks come from the indexer's keys there
