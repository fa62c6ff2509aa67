"""Graph-friendly ops for tracing a model into a graph file (ONNX): used by moela/export.py only, never
an engine backend.

    backend = ops.backend_of("export", moela.ops.export)
    quantize.prepare(model, backend)                       # then trace it with a StepContext.padded

The reference plans attention on the host from Python lists and runs the routed experts through
torch's grouped matmul, which has no ONNX op. Here every length lives in a tensor: a step is a padded
batch of B sequences with S new rows each (StepContext.padded), whose positions run on from
positions[:, 0], the length of what the sequence has cached. A graph never writes the cache (an
output that updates an input copies the whole cache every step): attention reads the cached prefix
from the cache and this step's rows from `latent`, and whoever runs the graph writes those rows into
the cache after it (moela/export.py has store_latent collect them as graph outputs). Rows past a
sequence's real ones are padding: they see only rows before them, so they never change a real row,
and the caller drops them. Other ops are the reference's, which trace as they are.
Letters: B sequences, S new rows per sequence, h heads, w latent width, c value width, t cached keys
(the table's blocks, whole); V3.2's indexer: H heads of D values.
"""

import torch
import torch.nn.functional as F

from moela.ops.reference import index_scores, swiglu


def step_rows(cache: torch.Tensor, new: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a step's queries read: each sequence's table blocks, whole, then its S new rows -> rows
    [B, t + S, w], and visible [B, S, t + S] (row s of a sequence sees cached rows before positions[b, 0]
    and new rows 0..s). new [B*S, w]; cache [num_blocks, block_size, w]."""
    B = ctx.block_tables.shape[0]
    positions = ctx.positions.view(B, -1)  # [B, S]
    S, w = positions.shape[1], new.shape[-1]
    cached = cache[ctx.block_tables].view(B, -1, w)  # [B, t, w]
    old = torch.arange(cached.shape[1], device=new.device) < positions[:, :1]  # [B, t]: cached before the step
    causal = torch.ones(S, S, dtype=torch.bool, device=new.device).tril()  # [S, S]
    visible = torch.cat([old[:, None, :].expand(B, S, -1), causal[None].expand(B, S, S)], dim=2)
    return torch.cat([cached, new.view(B, S, w)], dim=1), visible


def latent_attention(q: torch.Tensor, cache: torch.Tensor, latent: torch.Tensor, ctx, scale: float,
                     value_dim: int) -> torch.Tensor:
    """Absorbed MLA: row s of sequence b attends its cached keys before positions[b, 0] and its own new
    rows 0..s -> [B*S, h, value_dim]. q [B*S, h, w]; latent [B*S, w]; cache [num_blocks, block_size, w]."""
    keys, visible = step_rows(cache, latent, ctx)  # [B, t + S, w], [B, S, t + S]
    (B, S, _), (T, h, w) = visible.shape, q.shape
    scores = torch.einsum("bshw,btw->bsht", q.view(B, S, h, w), keys).float() * scale
    probs = scores.masked_fill(~visible[:, :, None, :], float("-inf")).softmax(dim=-1).to(keys.dtype)
    out = torch.einsum("bsht,btc->bshc", probs, keys[..., :value_dim])  # [B, S, h, c]
    return out.reshape(T, h, value_dim)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor, keys: torch.Tensor, ctx, topk: int,
                 scale: float) -> torch.Tensor:
    """V3.2's lightning indexer on a padded step: each query's `topk` best visible keys by the reference's
    index_scores -> [B*S, topk], -1 where it sees fewer. The picks index step_rows (the table's cached
    rows, then the new ones), not positions: sparse_latent_attention below reads the same rows.
    q [B*S, H, D]; weights [B*S, H] fp32; keys [B*S, D]; cache [num_blocks, block_size, D]."""
    rows, visible = step_rows(cache, keys, ctx)  # [B, t + S, D], [B, S, t + S]
    (B, S, _), (T, H, D) = visible.shape, q.shape
    scores = index_scores(q.view(B, S, H, D), weights.view(B, S, H), rows, scale).masked_fill(~visible, float("-inf"))
    return padded_topk(scores, topk).view(T, topk)


def padded_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the `topk` best of scores [..., n] (-inf = not visible), -1 past the visible ones. The
    scores gain topk columns of -inf first, so TopK's k is the constant topk even where n < topk."""
    best = torch.cat([scores, scores.new_full((*scores.shape[:-1], topk), float("-inf"))], dim=-1).topk(topk, dim=-1)
    return best.indices.masked_fill(best.values == float("-inf"), -1)


def sparse_latent_attention(q: torch.Tensor, cache: torch.Tensor, latent: torch.Tensor, indices: torch.Tensor, ctx,
                            scale: float, value_dim: int) -> torch.Tensor:
    """Absorbed MLA over the rows indexer_topk picked (indices [B*S, k] into step_rows, -1 = none)
    -> [B*S, h, value_dim]: each query gathers its k latent rows, whatever its context length."""
    rows, _ = step_rows(cache, latent, ctx)  # [B, t + S, w]
    (B, _, w), (T, h, _), k = rows.shape, q.shape, indices.shape[1]
    flat = indices.clamp(min=0).view(B, -1, 1).expand(-1, -1, w)  # [B, S*k, w]
    picked = rows.gather(1, flat).view(T, k, w)  # [B*S, k, w]
    scores = torch.einsum("thw,tkw->thk", q, picked).float() * scale
    probs = scores.masked_fill((indices < 0)[:, None, :], float("-inf")).softmax(dim=-1).to(picked.dtype)
    return torch.einsum("thk,tkc->thc", probs, picked[..., :value_dim])


def pack_experts(w13: torch.Tensor, w2: torch.Tensor, quant: None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One tensor per expert (views): each becomes a weight of its own in the graph, which a matmul reads
    where it lies (a gather from the stacked weights would copy it, or fold into a second copy). The
    graphs hold float weights only."""
    if quant is not None:
        raise ValueError(f"exported graphs hold float weights, not {quant!r}")
    return list(w13.unbind(0)), list(w2.unbind(0))


@torch.library.custom_op("moela::moe", mutates_args=())
def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: list[torch.Tensor],
        w2: list[torch.Tensor], limit: float | None = None) -> torch.Tensor:
    """Routed experts, one gather / two matmuls / one scatter-add per expert over the tokens routed to
    it, so a step reads only the experts its tokens chose. One opaque op to the tracer (a custom op
    with a shape-only fake below): traced as Python, each expert's data-dependent row count would be a
    symbol of its own, and tracing a 64-expert layer would take minutes. moela/export.py writes the
    same loop in ONNX ops (NonZero gives each expert's rows)."""
    out = torch.zeros_like(x)
    for e in range(len(w13)):
        token, slot = torch.where(indices == e)  # [n] each: the tokens routed to e, and which of their k
        y = F.linear(swiglu(F.linear(x[token], w13[e]), limit), w2[e])  # [n, d]
        out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
    return out


@moe.register_fake
def _(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: list[torch.Tensor],
      w2: list[torch.Tensor], limit: float | None = None) -> torch.Tensor:
    return torch.empty_like(x)


def plan(ctx) -> None:
    """Nothing to plan: a graph reads its indices from the step's tensors."""
