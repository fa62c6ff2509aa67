"""DeepSeek-V4: one shared K=V head per layer over a sliding window plus compressed entries, mHC
hyper-connections between blocks, hash-routed and clamped-SwiGLU MoE. Math only.

    model = build_model(cfg)        # moela.models, cfg.model_type == "deepseek_v4"

Every layer attends the last `sliding_window` tokens. A CSA layer also attends the `index_topk`
entries its lightning indexer picks among the ones its compressor emits, one per `csa_rate` tokens
(each pooling two overlapping windows); an HCA layer attends every entry its compressor emits, one
per `hca_rate` tokens. Queries get a per-head RMSNorm, keys and queries rope on their trailing rope
dims, the output is un-rotated, a learned sink logit per head joins the softmax, and a grouped
low-rank projection maps heads back. The residual is `hc_mult` streams mixed by Sinkhorn-projected
matrices (mHC). What each layer caches (CacheSpecs, see `Attention.cache_specs`): the window ring and
each compressor's pending rows (and CSA's overlap) per sequence; the compressed entries per token.
Letters: T tokens, H heads, d head_dim, N hc_mult, g o_groups.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moela.config import ModelConfig
from moela.models.context import CacheSpec, StepContext
from moela.models.layers import (MLP, Experts, Gate, HashGate, Linear, OpsModule, Rope, attach_layer_caches,
                                 layer_cache_specs, reset_buffers)


class Norm(OpsModule):
    """RMSNorm whose fp32 weight multiplies in fp32, cast once at the end (V4's rounding)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x.float(), self.weight.float(), self.eps).to(x.dtype)


class Compressor(OpsModule):
    """Pools each window of `rate` tokens into one cache entry: per channel, a softmax over the window
    (gate + learned position bias) weights the tokens' projections; then RMSNorm and rope at the window's
    first position. With `overlap` (CSA) an entry pools 2*rate slots: the previous window's first series
    and this window's second one. Tokens of a window not yet full wait in per-sequence pending rows; CSA
    also carries the last full window's first series."""

    def __init__(self, dim: int, width: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.width, self.rate, self.overlap = width, rate, overlap
        series = 2 if overlap else 1
        self.wkv = Linear(dim, series * width)
        self.wgate = Linear(dim, series * width)
        self.ape = nn.Parameter(torch.empty(rate, series * width))  # gate bias per slot of the window, fp32
        self.norm = Norm(width, eps)
        self.entries = self.pending = self.carry = None  # caches, set by the engine

    def cache_specs(self, prefix: str, kind: str) -> list[CacheSpec]:
        series = 2 if self.overlap else 1
        specs = [CacheSpec(prefix + "entries", kind, self.width, tokens_per_entry=self.rate),
                 CacheSpec(prefix + "pending", kind + " pending", 2 * series * self.width, entries_per_sequence=self.rate - 1)]
        if self.overlap:
            specs.append(CacheSpec(prefix + "carry", kind + " overlap", 2 * self.width, entries_per_sequence=self.rate))
        return specs

    def forward(self, x: torch.Tensor, ctx: StepContext, rope: Rope) -> list[torch.Tensor]:
        """Every entry of each sequence so far, [E_b, width] per sequence, after emitting this step's."""
        kv, gate = self.wkv(x), self.wgate(x)  # [T, series * width]
        out = []
        for b, (q_len, kv_len) in enumerate(zip(ctx.q_lens, ctx.kv_lens)):
            a, start, end = ctx.q_starts[b], kv_len - q_len, kv_len
            slot = None if self.pending is None else ctx.seq_slots[b]
            first = start // self.rate  # the window that `start` falls in
            waiting = torch.arange(start - first * self.rate, device=x.device)
            pending = kv[:0].repeat(1, 2) if slot is None else rows(self.pending, slot, waiting)
            seq_kv = torch.cat([pending[:, : kv.shape[1]], kv[a : a + q_len]])  # positions [first * rate, end)
            seq_gate = torch.cat([pending[:, kv.shape[1] :], gate[a : a + q_len]])
            new = self.pool(seq_kv, seq_gate, first, end // self.rate - first, slot, rope)
            if slot is None:
                out.append(new)
                continue
            self.store(new, seq_kv, seq_gate, first, end, ctx.block_tables[b], slot)
            out.append(self.read(end // self.rate, ctx.block_tables[b]))
        return out

    def pool(self, seq_kv: torch.Tensor, seq_gate: torch.Tensor, first: int, n: int, slot, rope: Rope) -> torch.Tensor:
        """Entries [n, width] of the n windows from `first` on, whose rows start seq_kv / seq_gate."""
        if n == 0:
            return seq_kv.new_zeros(0, self.width)
        kv = seq_kv[: n * self.rate].view(n, self.rate, -1)
        gate = seq_gate[: n * self.rate].view(n, self.rate, -1) + self.ape  # fp32
        if self.overlap:  # slots: the previous window's first series, then this window's second series
            w = self.width
            prev_kv, prev_gate = kv.new_zeros(n, self.rate, w), gate.new_full((n, self.rate, w), float("-inf"))
            prev_kv[1:], prev_gate[1:] = kv[:-1, :, :w], gate[:-1, :, :w]
            if first > 0:  # the window before `first` closed in an earlier step: its series is carried
                carry = rows(self.carry, slot, torch.arange(self.rate, device=kv.device))
                prev_kv[0], prev_gate[0] = carry[:, :w], carry[:, w:] + self.ape[:, :w]
            kv, gate = torch.cat([prev_kv, kv[..., w:]], dim=1), torch.cat([prev_gate, gate[..., w:]], dim=1)
        pooled = self.norm((kv * gate.softmax(dim=1).to(kv.dtype)).sum(dim=1))  # [n, width]
        cos, sin = rope(torch.arange(first, first + n, device=kv.device) * self.rate)
        return rope_tail(self.ops, pooled, cos, sin)

    def store(self, new: torch.Tensor, seq_kv, seq_gate, first: int, end: int, table: torch.Tensor, slot) -> None:
        """Write the new entries into the paged cache; keep the rows of the window still open, and (CSA)
        the first series of the last full window."""
        per_block = self.entries.shape[1]
        index = torch.arange(first, first + len(new), device=new.device)
        self.entries.view(-1, self.width).index_copy_(0, table[index // per_block] * per_block + index % per_block, new)
        done = end // self.rate * self.rate - first * self.rate  # rows of seq_kv that closed windows
        write(self.pending, slot, torch.cat([seq_kv[done:], seq_gate[done:]], dim=-1))
        if self.overlap and len(new):
            last = slice(done - self.rate, done)
            write(self.carry, slot, torch.cat([seq_kv[last, : self.width], seq_gate[last, : self.width]], dim=-1))

    def read(self, n: int, table: torch.Tensor) -> torch.Tensor:
        """The sequence's first n entries [n, width] from the paged cache."""
        per_block = self.entries.shape[1]
        index = torch.arange(n, device=table.device)
        return self.entries.view(-1, self.width)[table[index // per_block] * per_block + index % per_block]


class Indexer(OpsModule):
    """CSA's lightning indexer: its own compressor makes keys, one per csa_rate tokens; each query picks
    the index_topk of its visible entries with the best sum_h w_h * relu(q_h . k / sqrt(D))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ix, v4 = cfg.indexer, cfg.v4
        self.n_heads, self.head_dim, self.topk, self.rate = ix.n_heads, ix.head_dim, ix.topk, v4.csa_rate
        self.wq_b = Linear(cfg.q_lora_rank, ix.n_heads * ix.head_dim)
        self.weights_proj = Linear(cfg.hidden_size, ix.n_heads)
        self.compressor = Compressor(cfg.hidden_size, ix.head_dim, v4.csa_rate, True, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: StepContext, rope: Rope) -> list[torch.Tensor]:
        """Per sequence, the entries [n_b, topk] each of its queries attends (-1: none)."""
        keys = self.compressor(x, ctx, rope)
        q, weights = self.queries(x, q_resid, cos, sin)
        picks = []
        for b, k in enumerate(keys):
            rows = slice(ctx.q_starts[b], ctx.q_starts[b + 1])
            scores = self.ops.index_scores(q[rows], weights[rows], k, self.head_dim**-0.5)  # [n, E]
            visible = (ctx.positions[rows] + 1) // self.rate  # entries each query may see
            scores = scores.masked_fill(torch.arange(len(k), device=x.device) >= visible[:, None], float("-inf"))
            best = scores.topk(min(self.topk, len(k)), dim=-1)
            picks.append(best.indices.masked_fill(best.values == float("-inf"), -1))
        return picks

    def queries(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [T, H, D], their per-head weights [T, H] fp32)."""
        q = rope_tail(self.ops, self.wq_b(q_resid).view(x.shape[0], self.n_heads, self.head_dim), cos, sin)
        return q, self.weights_proj(x).float() * self.n_heads**-0.5


class Attention(OpsModule):
    """Sliding-window attention over one shared K=V head, plus the compressed entries of CSA/HCA layers."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        v4, d = cfg.v4, cfg.hidden_size
        self.kind, self.n_heads, self.head_dim, self.window = v4.layer_types[layer_id], cfg.num_attention_heads, v4.head_dim, v4.sliding_window
        self.groups, self.eps = v4.o_groups, cfg.rms_norm_eps
        self.wq_a = Linear(d, cfg.q_lora_rank)
        self.q_norm = Norm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wkv = Linear(d, self.head_dim)
        self.kv_norm = Norm(self.head_dim, cfg.rms_norm_eps)
        self.wo_a = Linear(self.n_heads * self.head_dim // v4.o_groups, v4.o_groups * v4.o_lora_rank, sliced=True)
        self.wo_b = Linear(v4.o_groups * v4.o_lora_rank, d)
        self.attn_sink = nn.Parameter(torch.empty(self.n_heads))  # fp32
        rate = v4.csa_rate if self.kind == "csa" else v4.hca_rate
        self.compressor = None if self.kind == "sliding" else Compressor(d, self.head_dim, rate, self.kind == "csa", self.eps)
        self.indexer = Indexer(cfg) if self.kind == "csa" else None
        self.window_cache: torch.Tensor | None = None  # [num_slots, window, head_dim], set by the engine

    def cache_specs(self) -> list[CacheSpec]:
        specs = [CacheSpec("window_cache", "window", self.head_dim, entries_per_sequence=self.window)]
        if self.compressor is not None:
            specs += self.compressor.cache_specs("compressor.", self.kind)
        if self.indexer is not None:
            specs += self.indexer.compressor.cache_specs("indexer.compressor.", "csa indexer")
        return specs

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext, rope: Rope) -> torch.Tensor:
        q_resid, q, kv = self.project(x, cos, sin)
        entries = self.compressor(x, ctx, rope) if self.compressor is not None else None
        picks = self.indexer(x, q_resid, cos, sin, ctx, rope) if self.indexer is not None else None
        out = torch.empty_like(q)
        for b, (q_len, kv_len) in enumerate(zip(ctx.q_lens, ctx.kv_lens)):
            a = ctx.q_starts[b]
            keys, key_pos = self.window_keys(kv[a : a + q_len], kv_len - q_len, ctx, b)
            pos = ctx.positions[a : a + q_len, None]
            mask = (key_pos <= pos) & (key_pos > pos - self.window)  # [n, s]
            extra = extra_mask = None
            if self.kind == "hca":  # every entry this query can see
                visible = torch.arange(len(entries[b]), device=x.device) < (pos + 1) // self.compressor.rate
                keys, mask = torch.cat([keys, entries[b]]), torch.cat([mask, visible], dim=1)
            elif self.kind == "csa":  # the entries the indexer picked
                extra, extra_mask = entries[b][picks[b].clamp(min=0)], picks[b] >= 0  # [n, k, d], [n, k]
            out[a : a + q_len] = self.ops.sink_attention(q[a : a + q_len], keys, mask, extra, extra_mask,
                                                         self.attn_sink, self.head_dim**-0.5)
        return self.output(out, cos, sin)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query LoRA residual [T, q_lora_rank], queries [T, H, d], the shared key = value [T, d]), roped."""
        q_resid = self.q_norm(self.wq_a(x))
        q = self.ops.rms_norm(self.wq_b(q_resid).view(x.shape[0], self.n_heads, self.head_dim), None, self.eps)
        return q_resid, rope_tail(self.ops, q, cos, sin), rope_tail(self.ops, self.kv_norm(self.wkv(x)), cos, sin)

    def output(self, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output [T, H, d] -> [T, hidden_size]: un-rotated, then the grouped low-rank projection."""
        out = rope_tail(self.ops, out, cos, -sin)  # values carried their keys' rotation: undo it at the query
        grouped = out.view(out.shape[0], self.groups, -1)  # [T, g, H*d/g]
        w = self.wo_a.weight.view(self.groups, -1, grouped.shape[-1])  # [g, o_lora_rank, H*d/g]
        return self.wo_b(torch.einsum("tgi,goi->tgo", grouped, w).flatten(1))

    def window_keys(self, kv: torch.Tensor, start: int, ctx: StepContext, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [s, d] of positions [start - window + 1, start + len(kv)) and those positions; keeps the
        last `window` of them in the sequence's ring."""
        end, first = start + len(kv), max(0, start - self.window + 1)
        positions = torch.arange(first, end, device=kv.device)
        if self.window_cache is None:
            return kv, positions
        slot = ctx.seq_slots[b]
        keys = torch.cat([rows(self.window_cache, slot, positions[: start - first] % self.window), kv])
        kept = positions[-min(len(positions), self.window):]
        write(self.window_cache, slot, keys[-len(kept):], kept % self.window)
        return keys, positions


def rows(cache: torch.Tensor, slot: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Entries `index` of a sequence's slot in a per-sequence cache [num_slots, entries, width]."""
    return cache.view(-1, cache.shape[-1])[slot * cache.shape[1] + index]


def write(cache: torch.Tensor, slot: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None = None) -> None:
    """Put values [n, width] at entries `index` (default: the first n) of a sequence's slot."""
    index = torch.arange(len(values), device=values.device) if index is None else index
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot * cache.shape[1] + index, values.to(cache.dtype))


def rope_tail(ops, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rope on the trailing 2 * cos.shape[-1] values of x [T, ..., d], interleaved pairs, in place."""
    r = 2 * cos.shape[-1]
    return torch.cat([x[..., :-r], ops.rope(x[..., -r:], cos, sin, True)], dim=-1)


class HyperConnection(nn.Module):
    """mHC: from the N residual streams [T, N, d], the weights that collapse them into a block's input
    (pre), spread its output back (post) and mix the streams (comb, made doubly stochastic by Sinkhorn)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v4 = cfg.v4
        self.n, self.iters, self.eps, self.norm_eps = v4.hc_mult, v4.hc_sinkhorn_iters, v4.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + self.n) * self.n, self.n * cfg.hidden_size))  # fp32
        self.base = nn.Parameter(torch.empty((2 + self.n) * self.n))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(post [T, N], comb [T, N, N], block input [T, d])."""
        n = self.n
        mix = F.linear(F.rms_norm(h.flatten(1).float(), (h.shape[1] * h.shape[2],), None, self.norm_eps), self.fn.float())
        pre, post, comb = (part * scale + base for part, scale, base in  # [T, N], [T, N], [T, N*N]
                           zip(mix.split([n, n, n * n], dim=-1), self.scale, self.base.split([n, n, n * n])))
        comb = comb.view(-1, n, n).softmax(dim=-1) + self.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):  # Sinkhorn: rows, then columns
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        collapsed = ((pre.sigmoid() + self.eps)[..., None] * h).sum(dim=1).to(h.dtype)
        return 2 * post.sigmoid(), comb, collapsed


class HyperHead(nn.Module):
    """Collapses the N streams into one before the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n, self.eps, self.norm_eps = cfg.v4.hc_mult, cfg.v4.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty(self.n, self.n * cfg.hidden_size))  # fp32
        self.base = nn.Parameter(torch.empty(self.n))
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = F.rms_norm(h.flatten(1).float(), (h.shape[1] * h.shape[2],), None, self.norm_eps)
        pre = (F.linear(flat, self.fn.float()) * self.scale + self.base).sigmoid() + self.eps  # [T, N]
        return (pre[..., None] * h).sum(dim=1).to(h.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        limit, inter = cfg.v4.swiglu_limit, cfg.moe_intermediate_size
        self.gate = HashGate(cfg) if hashed else Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, inter, limit)
        self.shared_experts = MLP(cfg.hidden_size, cfg.n_shared_experts * inter, limit)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        weights, indices = self.gate(x, tokens) if isinstance(self.gate, HashGate) else self.gate(x)
        return self.experts(x, weights, indices) + self.shared_experts(x)


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = Norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.ffn_norm = Norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, cfg.v4.hash_layers[layer_id])
        self.hc_attn, self.hc_ffn = HyperConnection(cfg), HyperConnection(cfg)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, ropes: dict, ctx: StepContext) -> torch.Tensor:
        """h [T, N, d] -> [T, N, d]; ropes: each rope kind's (cos, sin) of the tokens, and the compress Rope."""
        cos, sin = ropes["main" if self.attn.kind == "sliding" else "compress"]
        post, comb, x = self.hc_attn(h)
        h = mix(h, post, comb, self.attn(self.attn_norm(x), cos, sin, ctx, ropes["rope"]))
        post, comb, x = self.hc_ffn(h)
        return mix(h, post, comb, self.ffn(self.ffn_norm(x), tokens))


def mix(h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The new streams: post_k * y + sum_j comb[j, k] * h_j (comb^T h), in h's dtype."""
    return post.to(h.dtype)[..., None] * y[:, None, :] + torch.matmul(comb.to(h.dtype).transpose(-1, -2), h)


class Transformer(OpsModule):
    naive_prefill = False  # no MLA: the split of naive and absorbed prompts does not apply
    fp32_params = ("attn_sink", "ape", "norm.weight", "hc_attn.fn", "hc_attn.base", "hc_attn.scale", "hc_ffn.fn",
                   "hc_ffn.base", "hc_ffn.scale", "hc_head.fn", "hc_head.base", "hc_head.scale", "gate.bias")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, v4 = cfg, cfg.v4
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg)
        self.norm = Norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rope = Rope(cfg.rope, cfg.qk_rope_head_dim)  # sliding-window layers
        self.compress_rope = Rope(v4.compress_rope, cfg.qk_rope_head_dim)  # CSA/HCA layers, compressors, indexers

    def init_buffers(self) -> None:
        reset_buffers(self)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """tokens, positions: [T] -> final-normed hidden states [T, hidden_size]."""
        ropes = {"main": self.rope(positions), "compress": self.compress_rope(positions), "rope": self.compress_rope}
        h = self.embed(tokens)[:, None, :].expand(-1, self.cfg.v4.hc_mult, -1)  # [T, N, d]
        for layer in self.layers:
            h = layer(h, tokens, ropes, ctx)
        return self.norm(self.hc_head(h))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def cache_specs(self) -> list[list[CacheSpec]]:
        return layer_cache_specs(self.layers)

    def attach_cache(self, caches: list[dict[str, torch.Tensor]] | None) -> None:
        attach_layer_caches(self.layers, caches)
