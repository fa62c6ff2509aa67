"""DeepSeek-V2/V3 transformer: MLA (naive + absorbed), gate, MoE, block. Math only.

    model = Transformer(cfg)                         # cfg: moela.config.ModelConfig
    ctx = StepContext.prefill([5, 3])                # two packed prompts, no cache
    hidden = model(tokens, ctx.positions, ctx)       # tokens: [T] packed in sequence order
    logits = model.logits(hidden)                    # [T, vocab]

Every forward takes a flat, packed token stream [T] and a StepContext that says where each sequence
starts, how long its context is and, when a latent cache is attached (`model.attach_cache`), which
cache slots its tokens live in. The paged-cache reads/writes are in moela/ops.py.
Letters in einsums: t tokens, s cached positions, h heads, d nope head dim, r rope dim,
c kv_lora_rank, v v_head_dim, b sequences.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moela import ops
from moela.config import ModelConfig, yarn_mscale


@dataclass
class StepContext:
    """One step's batch layout: sequences packed back to back, each with q_len new tokens."""

    positions: torch.Tensor  # [T] int64, absolute position of each token
    q_lens: list[int]  # new tokens per sequence
    kv_lens: list[int]  # context length per sequence after this step (cached + new)
    slot_mapping: torch.Tensor | None = None  # [T] flat cache slot of each new token
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int64
    naive_prefill: bool = True  # decompress K/V for prompts with no cached prefix
    q_starts: list[int] = field(init=False)
    absorbed_plan: list | None = None  # gather/mask plan of the absorbed path, built once per step by ops

    def __post_init__(self) -> None:
        self.q_starts = [0]
        for n in self.q_lens:
            self.q_starts.append(self.q_starts[-1] + n)

    @classmethod
    def prefill(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "StepContext":
        """Full sequences with no cache: training, scoring, or a first prefill."""
        positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])
        return cls(positions=positions, q_lens=list(seq_lens), kv_lens=list(seq_lens))


class Linear(nn.Linear):
    """nn.Linear without bias; a single row goes through ops.linear's matrix-vector path."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalized in fp32, cast back to x's dtype, then scaled: bit-identical to HF's RMSNorm
        return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rope dims and the cos/sin scale (YaRN's attention factor)."""
    rope, dim = cfg.rope, cfg.qk_rope_head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope.rope_type != "yarn":
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)
    factor = rope.attention_factor
    if factor is None:
        if rope.mscale and rope.mscale_all_dim:
            factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            factor = yarn_mscale(rope.factor)
    return inv_freq, float(factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate pairs of x [T, ..., r] by cos/sin [T, r/2]; pairs are (2i, 2i+1) or (i, i + r/2)."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin, h = cos.view(shape), sin.view(shape), x.float()
    if interleave:
        x1, x2 = h[..., 0::2], h[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = h.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class MLA(nn.Module):
    """Multi-head Latent Attention. The cache holds only [c_KV | k_pe] per token (cfg.latent_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_lora_rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim, self.interleave = cfg.v_head_dim, cfg.rope_interleave
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
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.wo = Linear(cfg.num_attention_heads * cfg.v_head_dim, cfg.hidden_size)
        self.kv_cache: torch.Tensor | None = None  # [num_blocks, block_size, latent_dim], set by the runner

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(T, self.n_heads, -1)  # [T, h, d + r]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = torch.cat([self.kv_norm(c_kv), apply_rope(k_pe, cos, sin, self.interleave)], dim=-1)  # [T, c + r]
        if self.kv_cache is not None:
            ops.store_latent(self.kv_cache, ctx.slot_mapping, latent)

        out = x.new_empty(T, self.n_heads, self.v_head_dim)
        absorbed = []
        for i, (q_len, kv_len) in enumerate(zip(ctx.q_lens, ctx.kv_lens)):
            a, b = ctx.q_starts[i], ctx.q_starts[i + 1]
            if ctx.naive_prefill and q_len == kv_len and q_len > 1:
                out[a:b] = self.naive(q_nope[a:b], q_pe[a:b], latent[a:b])
            else:
                absorbed.append(i)
        if absorbed:
            self.absorbed(q_nope, q_pe, latent, ctx, absorbed, out)
        return self.wo(out.flatten(1))

    def naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Causal attention over one sequence's own tokens, K/V decompressed through wkv_b."""
        S = latent.shape[0]
        kv = self.wkv_b(latent[:, : self.kv_lora_rank]).view(S, self.n_heads, -1)  # [S, h, d + v]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = latent[:, None, self.kv_lora_rank :].expand(S, self.n_heads, self.qk_rope_head_dim)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [h, S, d + r]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(0, 1)
        return ops.causal_attention(q, k, v.transpose(0, 1), self.softmax_scale).transpose(0, 1)  # [S, h, v]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_b split per head into contiguous w_uk [h, d, c] and w_uv^T [h, c, v], rebuilt if wkv_b changes."""
        w = self.wkv_b.weight
        key = (w.data_ptr(), w._version)
        if getattr(self, "_absorbed_key", None) != key:
            wkv_b = w.detach().view(self.n_heads, -1, self.kv_lora_rank)  # [h, d + v, c]
            self._w_uk = wkv_b[:, : self.qk_nope_head_dim].contiguous()
            self._w_uv_t = wkv_b[:, self.qk_nope_head_dim :].transpose(1, 2).contiguous()
            self._absorbed_key = key
        return self._w_uk, self._w_uv_t

    def absorbed(self, q_nope, q_pe, latent, ctx: StepContext, seqs: list[int], out: torch.Tensor) -> None:
        """Attention in latent space: wkv_b's K part folded into q, its V part applied after."""
        w_uk, w_uv_t = self.absorbed_weights()
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, h, c]
        q = torch.cat([q_lat, q_pe], dim=-1)  # [T, h, c + r]: scores = q . [c_kv | k_pe]
        for rows, keys, mask in ops.latent_batches(self.kv_cache, latent, ctx, seqs):
            # rows: [b, n] token indices (-1 = pad), keys: [b, s, c + r], mask: [b, n, s] True = attend
            b, n = rows.shape
            qb = q[rows.clamp(min=0)].flatten(1, 2)  # [b, n*h, c + r]
            scores = torch.bmm(qb, keys.transpose(1, 2)).view(b, n, self.n_heads, -1)  # [b, n, h, s]
            scores = (scores.float() * self.softmax_scale).masked_fill(~mask[:, :, None, :], float("-inf"))
            probs = scores.softmax(dim=-1).to(keys.dtype).flatten(1, 2)  # [b, n*h, s]
            o = torch.bmm(probs, keys[..., : self.kv_lora_rank]).view(b * n, self.n_heads, -1)  # [b*n, h, c]
            o = torch.bmm(o.transpose(0, 1), w_uv_t).transpose(0, 1).view(b, n, self.n_heads, -1)  # [b, n, h, v]
            valid = rows >= 0
            out[rows[valid]] = o[valid]


class MLP(nn.Module):
    """SwiGLU with gate and up fused into one matrix: w2(silu(x w1) * x w3)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w13 = Linear(dim, 2 * inter_dim)
        self.w2 = Linear(inter_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(g) * u)


class Gate(nn.Module):
    """Router: scores, optional group limit, top-k, weights. Returns (weights fp32, indices) [T, k]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.method, self.score_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if self.method == "noaux_tc" else None
        self.register_buffer("bias", bias)  # e_score_correction_bias, kept in fp32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias
        if self.method != "greedy":
            grouped = choice.view(x.shape[0], self.n_group, -1)  # [T, G, E/G]
            group_scores = grouped.amax(-1) if self.method == "group_limited_greedy" else grouped.topk(2, -1)[0].sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], True)
            fill = 0.0 if self.method == "group_limited_greedy" else float("-inf")
            choice = grouped.masked_fill(~keep[..., None], fill).flatten(1)
        indices = choice.topk(self.topk, dim=-1)[1]
        weights = (scores if self.method == "noaux_tc" else choice).gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices


class Experts(nn.Module):
    """Routed experts stacked as [E, ...] so a step's tokens are dispatched grouped by expert."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.register_buffer("load", torch.zeros(n_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        k = indices.shape[1]
        order = indices.flatten().argsort(stable=True)  # [T*k] slots sorted by expert
        load = torch.bincount(indices.flatten(), minlength=len(self.w13))
        self.load += load  # tokens routed to each expert since start-up (metrics, balancing)
        counts = load.tolist()
        token = order // k
        xs = x[token]
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                g, u = ops.linear(xs[start : start + n], self.w13[e]).chunk(2, dim=-1)
                ys[start : start + n] = ops.linear(F.silu(g) * u, self.w2[e])
                start += n
        by_token = torch.empty_like(ys)
        by_token[order] = ys  # back to token-major: [T*k, d] = [T, k, d]
        return torch.bmm(weights[:, None, :].to(x.dtype), by_token.view(-1, k, x.shape[1]))[:, 0]  # [T, d]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, n_shared * cfg.moe_intermediate_size) if n_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.gate(x)
        y = self.experts(x, weights, indices)
        return y if self.shared_experts is None else y + self.shared_experts(x)


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, ctx)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent buffers (rope frequencies, expert load counters); call after
        building on the meta device and materializing with to_empty."""
        inv_freq, self.rope_scale = rope_inv_freq(self.cfg)
        self.register_buffer("inv_freq", inv_freq.to(self.embed.weight.device), persistent=False)
        for module in self.modules():
            if isinstance(module, Experts):
                module.load.zero_()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """tokens, positions: [T] -> final-normed hidden states [T, hidden_size]."""
        cos, sin = self.rope(positions)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        return self.norm(h)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, r/2] of each position, scaled by YaRN's attention factor."""
        angles = positions[:, None].float() * self.inv_freq  # [T, r/2]
        return angles.cos() * self.rope_scale, angles.sin() * self.rope_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.head is None else self.head.weight
        return ops.linear(hidden, weight)

    def attach_cache(self, caches: list[torch.Tensor] | None) -> None:
        """Give each MLA layer its latent cache [num_blocks, block_size, latent_dim] (None detaches)."""
        for i, layer in enumerate(self.layers):
            layer.attn.kv_cache = None if caches is None else caches[i]
