"""DeepSeek-V2/V3 (and Kimi K2): MLA (naive + absorbed), MoE blocks, the transformer. Math only.

    model = build_model(cfg, torch.float32)          # moela.models: cfg is a ModelConfig
    ctx = StepContext.prefill([5, 3])                # two packed prompts, no cache
    hidden = model(tokens, ctx.positions, ctx)       # tokens: [T] packed in sequence order
    logits = model.logits(hidden)                    # [T, vocab]

Every forward takes a flat, packed token stream [T] and a StepContext that says where each sequence
starts, how long its context is and, once the engine has attached a cache (`attach_cache`), which
cache rows its tokens live in. Each MLA layer caches only [c_KV | k_pe] per token (CacheSpec kind
"latent"). Letters in einsums: t tokens, h heads, d nope head dim, r rope dim, c kv_lora_rank,
v v_head_dim.
"""

import torch
from torch import nn

from moela.config import ModelConfig
from moela.models.context import CacheSpec, StepContext
from moela.models.layers import (MLP, Linear, MoE, OpsModule, RMSNorm, Rope, attach_layer_caches, layer_cache_specs,
                                 reset_buffers)


class MLA(OpsModule):
    """Multi-head Latent Attention. The cache holds only [c_KV | k_pe] per token (cfg.latent_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_lora_rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim, self.interleave, self.latent_dim = cfg.v_head_dim, cfg.rope_interleave, cfg.latent_dim
        self.softmax_scale = cfg.softmax_scale
        q_out = cfg.num_attention_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = Linear(cfg.hidden_size, q_out)
        else:
            self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank)
            self.wq_b = Linear(cfg.q_lora_rank, q_out)
        self.wkv_a = Linear(cfg.hidden_size, cfg.latent_dim)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), sliced=True)
        self.wo = Linear(cfg.num_attention_heads * cfg.v_head_dim, cfg.hidden_size)
        self.kv_cache: torch.Tensor | None = None  # [num_blocks, block_size, latent_dim], set by the engine

    def cache_specs(self) -> list[CacheSpec]:
        return [CacheSpec("kv_cache", "latent", self.latent_dim)]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        T = x.shape[0]
        q_nope, q_pe, latent, _ = self.project(x, cos, sin, ctx)
        naive, absorbed = ctx.split()
        if not naive:
            return self.wo(self.absorbed(q_nope, q_pe, latent, ctx).flatten(1))
        out = x.new_empty(T, self.n_heads, self.v_head_dim)
        for i in naive:
            a, b = ctx.q_starts[i], ctx.q_starts[i + 1]
            out[a:b] = self.naive(q_nope[a:b], q_pe[a:b], latent[a:b])
        if absorbed:
            rows = ctx.absorbed_rows()
            out.index_copy_(0, rows, self.absorbed(q_nope, q_pe, latent, ctx, rows))
        return self.wo(out.flatten(1))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> tuple:
        """(q_nope [T, h, d], roped q_pe [T, h, r], latent [T, c + r], the query LoRA's normed output or None);
        the latent goes into the cache."""
        q_resid = None if hasattr(self, "wq") else self.q_norm(self.wq_a(x))
        q = (self.wq(x) if q_resid is None else self.wq_b(q_resid)).view(x.shape[0], self.n_heads, -1)  # [T, h, d + r]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = self.ops.rope(q_pe, cos, sin, self.interleave)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = torch.cat([self.kv_norm(c_kv), self.ops.rope(k_pe, cos, sin, self.interleave)], dim=-1)  # [T, c + r]
        if self.kv_cache is not None:
            self.ops.store_latent(self.kv_cache, ctx.slot_mapping, latent)
        return q_nope, q_pe, latent, q_resid

    def naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Causal attention over one sequence's own tokens, K/V decompressed through wkv_b."""
        S = latent.shape[0]
        kv = self.wkv_b(latent[:, : self.kv_lora_rank]).view(S, self.n_heads, -1)  # [S, h, d + v]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = latent[:, None, self.kv_lora_rank :].expand(S, self.n_heads, self.qk_rope_head_dim)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [h, S, d + r]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(0, 1)
        return self.ops.causal_attention(q, k, v.transpose(0, 1), self.softmax_scale).transpose(0, 1)  # [S, h, v]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_b split per head into contiguous w_uk [h, d, c] and w_uv^T [h, c, v], rebuilt if wkv_b changes."""
        w = self.wkv_b.weight
        if torch.compiler.is_compiling():  # traced (torch.export): the split is part of the graph
            return self._split_wkv_b(w)
        key = (w.data_ptr(), w._version)
        if getattr(self, "_absorbed_key", None) != key:
            self._w_uk, self._w_uv_t = (t.contiguous() for t in self._split_wkv_b(w.detach()))
            self._absorbed_key = key
        return self._w_uk, self._w_uv_t

    def _split_wkv_b(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wkv_b = w.view(self.n_heads, -1, self.kv_lora_rank)  # [h, d + v, c]
        return wkv_b[:, : self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim :].transpose(1, 2)

    def absorbed(self, q_nope, q_pe, latent, ctx: StepContext, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention in latent space: wkv_b's K part folded into q, its V part applied after -> [T, h, v],
        or only the given token rows [len(rows), h, v]."""
        o = self.ops.latent_attention(self.absorb_query(q_nope, q_pe), self.kv_cache, latent, ctx, self.softmax_scale,
                                      self.kv_lora_rank)  # [T, h, c]
        return self.absorb_output(o if rows is None else o.index_select(0, rows))

    def absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[T, h, c + r]: wkv_b's K part folded into the query, so scores = q . [c_kv | k_pe]."""
        w_uk, _ = self.absorbed_weights()
        return torch.cat([torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1), q_pe], dim=-1)

    def absorb_output(self, o: torch.Tensor) -> torch.Tensor:
        """Latent-space output [T, h, c] -> [T, h, v] through wkv_b's V part."""
        return torch.bmm(o.transpose(0, 1), self.absorbed_weights()[1]).transpose(0, 1)


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig, attention: type[nn.Module] = MLA):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h, x = self.ffn_norm(self.attn(self.attn_norm(x), cos, sin, ctx), residual=x)  # x += attention; h = norm(x)
        return x + self.ffn(h)


class Transformer(OpsModule):
    attention = MLA  # the attention layer of every block
    naive_prefill = True  # prompts with nothing cached attend their own tokens with K/V decompressed
    fp32_params = ("gate.bias",)  # kept fp32 whatever the model's dtype (build_model)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(i, cfg, self.attention) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.rope = Rope(cfg.rope, cfg.qk_rope_head_dim)  # rope(positions) -> cos, sin [T, r/2]

    def init_buffers(self) -> None:
        reset_buffers(self)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """tokens, positions: [T] -> final-normed hidden states [T, hidden_size]."""
        cos, sin = self.rope(positions)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.embed.weight) if self.head is None else self.head(hidden)

    def cache_specs(self) -> list[list[CacheSpec]]:
        return layer_cache_specs(self.layers)

    def attach_cache(self, caches: list[dict[str, torch.Tensor]] | None) -> None:
        attach_layer_caches(self.layers, caches)
