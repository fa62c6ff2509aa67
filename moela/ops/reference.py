"""The reference backend: every op in plain PyTorch, on any device. The ground truth the others are
tested against (tests/test_ops.py), and what training runs.

Nothing here reads a tensor's values on the host, with one exception: off the CPU, torch's grouped
matmul takes bf16 only, and `moe` in other dtypes there loops over experts with their token counts
read on the host. With bf16 weights (and on the CPU in any dtype) a step's ops run on any device
without waiting on it; torch.compile and torch.export trace the grouped matmul in bf16 only. The paged latent cache of one MLA layer is [num_blocks, block_size,
width]; token p of a sequence lives in row p % block_size of block block_table[p // block_size], and
`slot_mapping` gives each new token's flat row (block * block_size + row).
Letters: T tokens, h heads, w latent width (c + r), c value width (kv_lora_rank), b sequences of a
group, n queries per sequence, s keys per sequence, E experts, k experts per token.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUANT_FORMATS = {"int8": (8, None), "int4-g32": (4, 32), "int4-g64": (4, 64), "int4-g128": (4, 128)}  # name -> (bits, group)


@dataclass
class QuantizedWeight:
    """A [out, in] weight as integer codes, weight-only. int8: codes int8 [out, in], one scale per row,
    w = code * scale. int4: codes 0..15 two to a byte (an even input's in the low nibble, uint8
    [out, in / 2]), a scale and a minimum per row and group of `group_size` inputs ([out, in / group_size]),
    w = code * scale + min. Scales and minimums are fp32."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    group_size: int | None = None

    @property
    def shape(self) -> torch.Size:
        out, width = self.codes.shape
        return torch.Size((out, width if self.group_size is None else 2 * width))

    def int4_codes(self) -> torch.Tensor:
        """An int4 weight's codes one to a byte: uint8 [out, in]."""
        return torch.stack([self.codes & 15, self.codes >> 4], dim=-1).flatten(-2)  # [out, in / 2, 2] -> [out, in]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.group_size is None:
            return (self.codes.float() * self.scales[:, None]).to(dtype)
        out, inp = self.shape
        codes = self.int4_codes().view(out, inp // self.group_size, self.group_size).float()  # [out, groups, group]
        return (codes * self.scales[..., None] + self.mins[..., None]).view(out, inp).to(dtype)


def weight_format(shape: tuple[int, int], fmt: str) -> str:
    """The QUANT_FORMATS format a [out, in] weight takes when `fmt` is asked for. int4 needs a group that
    divides `in` (the largest of the table up to fmt's: 192 inputs at group 128 take 64) and `out` in
    multiples of 16 (torch's int4 CPU layout packs rows in blocks of 16); otherwise the weight takes
    int8. Every backend applies this rule, so all hold the same codes."""
    bits, group = QUANT_FORMATS[fmt]
    out, inp = shape
    if bits == 8 or out % 16:
        return "int8"
    fits = [g for g in (32, 64, 128) if g <= group and inp % g == 0]
    return f"int4-g{fits[-1]}" if fits else "int8"


def quantize_weight(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Round-to-nearest codes of a [out, in] weight: int8 symmetric per row, int4 asymmetric (min/max) per
    group of inputs. `fmt` must fit the weight's input width (weight_format gives one that does)."""
    bits, group = QUANT_FORMATS[fmt]
    w = weight.detach().to(torch.float32, copy=True)  # the one temporary: every step below is in place
    out, inp = w.shape
    if bits == 8:
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [out]
        return QuantizedWeight(w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales)
    assert inp % group == 0, f"{fmt} does not fit {inp} inputs"
    w = w.view(out, inp // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    codes = w.sub_(lo[..., None]).div_(scales[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(out, inp)
    return QuantizedWeight(codes[:, 0::2] | codes[:, 1::2] << 4, scales, lo, group)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T -> [T, out]; a quantized weight is dequantized first (the ground truth)."""
    if isinstance(weight, QuantizedWeight):
        return F.linear(x, weight.dequantize(x.dtype))
    return F.linear(x, weight)


def pack_linear(weight: torch.Tensor, quantization: str | None = None) -> torch.Tensor | QuantizedWeight:
    """The layout linear reads: the weight itself, or its codes in a QUANT_FORMATS format."""
    if quantization is None or isinstance(weight, QuantizedWeight):
        return weight
    return quantize_weight(weight, weight_format(weight.shape, quantization))


def pack_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """An e4m3 weight [..., out, in] with block scales [..., ceil(out/bo), ceil(in/bi)], dequantized to
    dtype: W[i, j] = fp32(Wq[i, j]) * S[i // bo, j // bi] (edge blocks may be ragged)."""
    (bo, bi), (out_dim, in_dim) = block, weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(bo, -2)[..., :out_dim, :].repeat_interleave(bi, -1)[..., :in_dim]
    return (weight.float() * scale).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalized in fp32, cast back to x's dtype, then scaled (unless weight is None): bit-identical to
    HF's RMSNorm."""
    normed = F.rms_norm(x, (x.shape[-1],), None, eps)
    return normed if weight is None else weight * normed


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a pre-norm block's residual add and the norm after it."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate pairs of x [T, ..., r] by cos/sin [T, r/2] in fp32; pairs are (2i, 2i+1) (interleave, as
    DeepSeek's complex-number form) or (i, i + r/2); each pair stays where it is."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin, h = cos.view(shape), sin.view(shape), x.float()
    if interleave:
        x1, x2 = h[..., 0::2], h[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = h.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v for one sequence: q, k [h, S, dk], v [h, S, dv] -> [h, S, dv].

    Plain bmm + fp32 softmax, queries in chunks so the scores stay [h, chunk, S]; on CPU this beats
    scaled_dot_product_attention's kernel 2-5x for MLA's 192/128 head dims.
    """
    S = q.shape[1]
    out = q.new_empty(q.shape[0], S, v.shape[-1])
    for a in range(0, S, chunk):
        b = min(a + chunk, S)
        scores = torch.bmm(q[:, a:b], k[:, :b].transpose(1, 2)).float() * scale  # [h, b - a, b]
        future = torch.arange(b, device=q.device)[None, :] > torch.arange(a, b, device=q.device)[:, None]
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1).to(v.dtype)
        out[:, a:b] = torch.bmm(probs, v[:, :b])
    return out


def store_latent(cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor) -> None:
    """Write latent [T, w] into cache [num_blocks, block_size, w] at the flat rows slot_mapping [T]."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent.to(cache.dtype))


def latent_attention(q: torch.Tensor, cache: torch.Tensor | None, latent: torch.Tensor, ctx, scale: float,
                     value_dim: int) -> torch.Tensor:
    """Absorbed MLA: each query q [T, h, w] of ctx's absorbed sequences attends its sequence's cached
    latents (keys: all w values; values: the first value_dim) -> [T, h, value_dim], 0 for other rows.

    Without a cache (cache None) each sequence attends only its own new tokens in `latent` [T, w].
    The gathers are planned once per step (`_groups_plan`); keys are gathered per layer, whole blocks at
    a time.
    """
    T, h, _ = q.shape
    out = q.new_zeros(T, h, value_dim)
    for rows, keys, mask, src, dst in _groups(ctx, ctx.split()[1], cache, latent):
        # rows: [b, n] token of each query (-1 = pad); mask: [b, n, s] True = may attend; src -> dst: valid rows
        b, n = rows.shape
        qb = q[rows.clamp(min=0)].flatten(1, 2)  # [b, n*h, w]
        scores = torch.bmm(qb, keys.transpose(1, 2)).view(b, n, h, -1)  # [b, n, h, s]
        scores = (scores.float() * scale).masked_fill(~mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(keys.dtype).flatten(1, 2)  # [b, n*h, s]
        o = torch.bmm(probs, keys[..., :value_dim]).view(b * n, h, value_dim)
        out.index_copy_(0, dst, o.index_select(0, src))
    return out


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """The lightning indexer's score of each key for each query, in fp32: q [..., n, H, D], per-head
    weights [..., n, H], keys [..., s, D] -> sum_h weights_h * relu(q_h . k * scale) [..., n, s]."""
    scores = torch.einsum("...nhd,...sd->...nhs", q.float(), keys.float()).mul(scale).relu()
    return torch.einsum("...nh,...nhs->...ns", weights.float(), scores)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, extra_kv: torch.Tensor | None,
                   extra_mask: torch.Tensor | None, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """V4's attention, keys being the values: queries q [..., n, h, d] attend shared keys kv [..., s, d] (mask
    [..., n, s], True = may attend) and, when given, keys of their own extra_kv [..., n, k, d] (extra_mask
    [..., n, k]); a learned per-head sink logit sinks [h] joins the softmax and is dropped after it ->
    [..., n, h, d]. Leading dims (a padded batch of sequences) are optional."""
    logits = [(torch.einsum("...nhd,...sd->...nhs", q, kv) * scale).masked_fill(~mask.unsqueeze(-2), float("-inf"))]
    if extra_kv is not None:
        extra = torch.einsum("...nhd,...nkd->...nhk", q, extra_kv) * scale
        logits.append(extra.masked_fill(~extra_mask.unsqueeze(-2), float("-inf")))
    logits.append(sinks.float()[:, None].expand(*q.shape[:-1], 1))
    probs = torch.cat([t.float() for t in logits], dim=-1).softmax(dim=-1).to(q.dtype)  # [..., n, h, s (+ k) + 1]
    s = kv.shape[-2]
    out = torch.einsum("...nhs,...sd->...nhd", probs[..., :s], kv)
    if extra_kv is not None:
        out = out + torch.einsum("...nhk,...nkd->...nhd", probs[..., s:-1], extra_kv)
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor | None, keys: torch.Tensor, ctx,
                 topk: int, scale: float) -> torch.Tensor:
    """The lightning indexer: for each query q [T, H, D] (per-head weights [T, H], fp32) the positions of
    its sequence's `topk` best cached keys [N, bs, D] by sum_h weights_h * relu(q_h . k * scale), in fp32,
    among the positions it may attend -> [T, topk] int64, -1 where a query has fewer keys than topk.
    Without a cache, each sequence scores its own new keys [T, D]."""
    out = torch.full((q.shape[0], topk), -1, dtype=torch.long, device=q.device)
    for rows, k, mask, src, dst in _groups(ctx, range(len(ctx.q_lens)), cache, keys):
        total = index_scores(q[rows.clamp(min=0)], weights[rows.clamp(min=0)], k, scale)  # [b, n, s]
        total = total.masked_fill(~mask, float("-inf"))
        best = total.topk(min(topk, total.shape[-1]), dim=-1)  # [b, n, k]
        picks = best.indices.masked_fill(best.values == float("-inf"), -1).flatten(0, 1)  # [b*n, k]
        out[:, : picks.shape[1]] = out[:, : picks.shape[1]].index_copy(0, dst, picks.index_select(0, src))
    return out


def sparse_latent_attention(q: torch.Tensor, cache: torch.Tensor | None, latent: torch.Tensor, indices: torch.Tensor,
                            ctx, scale: float, value_dim: int, chunk: int = 256) -> torch.Tensor:
    """Absorbed MLA over the latent rows the indexer picked: query t of sequence b attends the cached
    latents at positions indices[t] (-1 = none) of b only -> [T, h, value_dim]. The cost of a query grows
    with topk, not with its context: rows are gathered, never scored densely. Queries go `chunk` at a
    time to bound the gathered keys [chunk, topk, w]."""
    T, h, _ = q.shape
    seq = ctx.token_seqs()  # [T] sequence of each token
    valid = indices >= 0
    pos = indices.clamp(min=0)
    if cache is None:  # each sequence's own new tokens: rows of `latent`
        rows, flat = ctx.token_starts()[:, None] + pos, latent
    else:
        bs = cache.shape[1]
        rows = ctx.block_tables[seq[:, None], pos // bs] * bs + pos % bs  # [T, k] flat cache rows
        flat = cache.view(-1, cache.shape[-1])
    out = q.new_empty(T, h, value_dim)
    for a in range(0, T, chunk):
        keys = flat[rows[a : a + chunk]]  # [t, k, w]
        scores = torch.einsum("thw,tkw->thk", q[a : a + chunk], keys).float() * scale
        probs = scores.masked_fill(~valid[a : a + chunk, None, :], float("-inf")).softmax(dim=-1)
        out[a : a + chunk] = torch.einsum("thk,tkc->thc", probs.to(keys.dtype), keys[..., :value_dim])
    return out


def plan(ctx) -> None:
    """Build the step's plans into ctx before the forward (the runner calls this): every index tensor a
    layer needs is then on the device already, and no layer waits for a host-to-device copy."""
    naive, absorbed = ctx.split()
    ctx.token_seqs()
    if absorbed:
        _groups_plan(ctx, absorbed, ctx.block_size)
        if naive:
            ctx.absorbed_rows()


def _groups(ctx, seqs, cache: torch.Tensor | None, rows_source: torch.Tensor) -> list[tuple]:
    """[(rows [b, n], keys [b, s, w], mask [b, n, s], src, dst)] for the sequences `seqs`: their keys gathered
    from the paged cache, whole blocks at a time (or, without a cache, from rows_source [T, w])."""
    plan = _groups_plan(ctx, list(seqs), None if cache is None else cache.shape[1])
    return [(rows, rows_source[rows.clamp(min=0)] if tables is None else cache[tables].flatten(1, 2), mask, src, dst)
            for rows, tables, mask, src, dst in plan]


def _groups_plan(ctx, seqs: list[int], block_size: int | None) -> list[tuple]:
    """[(rows, tables, mask, src, dst)] per group of `seqs`, from the host's lengths alone, built once per step.

    Single-token (decode) sequences form one group, padded to the longest context; every other sequence
    is a group of its own. Position p of a sequence is row p of its gathered blocks."""
    key = ("groups", block_size, tuple(seqs))
    if key in ctx.plans:
        return ctx.plans[key]
    device = ctx.positions.device
    decodes = [i for i in seqs if ctx.q_lens[i] == 1]
    groups = ([decodes] if decodes else []) + [[i] for i in seqs if ctx.q_lens[i] != 1]
    plan = []
    for group in groups:
        q_lens, kv_lens = [ctx.q_lens[i] for i in group], [ctx.kv_lens[i] for i in group]
        n, s = max(q_lens), max(kv_lens)
        if block_size is None:
            assert q_lens == kv_lens, "a cached prefix needs a cache"
            tables = None
        else:
            s = -(-s // block_size) * block_size  # keys come in whole blocks
            tables = ctx.block_tables[group, : s // block_size]  # [b, blocks]; padding rows are masked
        rows = [[ctx.q_starts[i] + j if j < q else -1 for j in range(n)] for i, q in zip(group, q_lens)]
        src = [b * n + j for b, q in enumerate(q_lens) for j in range(q)]
        dst = [ctx.q_starts[i] + j for i, q in zip(group, q_lens) for j in range(q)]
        q_pos = torch.tensor([[kv - q + j for j in range(n)] for q, kv in zip(q_lens, kv_lens)], device=device)  # [b, n]
        pos = torch.arange(s, device=device)
        kv = torch.tensor(kv_lens, device=device)
        mask = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < kv[:, None, None])  # [b, n, s]
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        plan.append((as_tensor(rows), tables, mask, as_tensor(src), as_tensor(dst)))
    ctx.plans[key] = plan
    return plan


def pack_experts(w13: torch.Tensor | list, w2: torch.Tensor | list, quantization: str | None = None) -> tuple:
    """Stacked experts as they are, or (quantized) one packed weight per expert."""
    if quantization is None and not isinstance(w13, list):
        return w13, w2
    return [pack_linear(w, quantization) for w in w13], [pack_linear(w, quantization) for w in w2]


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: torch.Tensor | list, w2: torch.Tensor | list,
        limit: float | None = None) -> torch.Tensor:
    """Routed experts: sum_k weights[t, k] * expert_{indices[t, k]}(x[t]) -> [T, d].

    x [T, d]; weights [T, k] fp32; indices [T, k]; w13 [E, 2I, d] (gate rows, then up rows); w2 [E, d, I];
    each expert is swiglu(x w13, limit) w2.
    The T*k (token, expert) pairs are sorted by expert and run as one grouped matmul per projection,
    with per-expert offsets computed on the device. Off the CPU, torch's grouped matmul takes bf16
    only; other dtypes there, and experts packed one by one (quantized), take expert_loop, which reads
    the per-expert counts on the host.
    """
    if isinstance(w13, list) or (x.device.type != "cpu" and x.dtype != torch.bfloat16):
        return expert_loop(x, weights, indices, w13, w2, linear, limit)
    k = indices.shape[1]
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # [T*k] pairs sorted by expert
    counts = torch.zeros(len(w13), dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
    xs = x[order // k]
    h = swiglu(F.grouped_mm(xs, w13.transpose(1, 2), offs=offsets), limit)
    ys = F.grouped_mm(h, w2.transpose(1, 2), offs=offsets)  # [T*k, d]
    return combine(ys, order, weights)


def swiglu(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up of [..., 2I] (gate half first); V4 clamps gate <= limit and up to [-limit, limit]."""
    g, u = gate_up.chunk(2, dim=-1)
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return F.silu(g) * u


def expert_loop(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13, w2, linear_op,
                limit: float | None = None) -> torch.Tensor:
    """moe as one linear_op pair per expert that has tokens (w13, w2: per-expert weights in linear_op's
    layout); slicing the sorted rows needs each expert's token count on the host."""
    k = indices.shape[1]
    order = indices.flatten().argsort(stable=True)  # [T*k] (token, expert) pairs sorted by expert
    counts = torch.bincount(indices.flatten(), minlength=len(w13)).tolist()
    xs = x[order // k]
    ys, start = [], 0
    for e, n in enumerate(counts):
        if n:
            ys.append(linear_op(swiglu(linear_op(xs[start : start + n], w13[e]), limit), w2[e]))
            start += n
    return combine(torch.cat(ys), order, weights)


def combine(ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs ys [T*k, d] in expert order -> their weighted sum per token [T, d]."""
    by_token = torch.empty_like(ys)
    by_token[order] = ys  # back to token-major: [T*k, d] = [T, k, d]
    T, k = weights.shape
    return torch.bmm(weights[:, None, :].to(ys.dtype), by_token.view(T, k, -1))[:, 0]
