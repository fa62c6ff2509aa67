"""DeepSeek-V4's attention on a padded step, for `moela export onnx` (moela/export.py): the same math as
moela/models/deepseek_v4.py with every length in a tensor, so one traced graph runs any batch.

    quantize.prepare(model, export_backend); export_v4.bind(model)    # then trace export.StepGraph

The model's attention loops over the step's sequences with their lengths on the host and writes its
caches in place. Here a step is B sequences of S new rows each (StepContext.padded), plus seq_slots [B]
and plans["lengths"] [B] (each sequence's real rows; the rest is padding), and nothing is written:
- the window ring [num_slots, window, d], entry i holding the latest position = i (mod window), is read at
  the sequence's slot; the graph returns the whole updated ring [B, window, d];
- a compressor's pending rows (the open window's, entry p % rate) and CSA's carry (the last closed
  window's first series) likewise come back whole, [B, entries, width];
- its paged entries (one per `rate` tokens, in the sequence's blocks) come back as the K = ceil(S / rate)
  windows from the one positions[:, 0] falls in, [B, K, width]; the runner writes those the step closed.
Padding rows see only rows before them and enter no state, so they never change a real row.
Letters: B sequences, S new rows, W window, K windows per step, E entries a sequence has in its blocks.
"""

from dataclasses import dataclass

import torch

from moela.models import deepseek_v4 as v4
from moela.models.layers import Rope
from moela.ops.export import padded_topk


@dataclass
class Step:
    positions: torch.Tensor  # [B, S]
    start: torch.Tensor  # [B] rows each sequence has cached (positions[:, 0])
    end: torch.Tensor  # [B] start + its real new rows
    slots: torch.Tensor  # [B] its slot in the per-sequence caches
    tables: torch.Tensor  # [B, blocks] its block table


def bind(model: v4.Transformer) -> None:
    """Route every V4 attention layer of `model` through `attention` below (export only: the model's own
    forward then no longer runs)."""
    for module in model.modules():
        if isinstance(module, v4.Attention):
            module.forward = attention.__get__(module)


def step_of(ctx) -> Step:
    """The step's tensors, built once per trace (ctx.plans)."""
    if "v4" not in ctx.plans:
        B = ctx.block_tables.shape[0]
        positions = ctx.positions.view(B, -1)  # [B, S]
        start = positions[:, 0]
        ctx.plans["v4"] = Step(positions, start, start + ctx.plans["lengths"], ctx.seq_slots, ctx.block_tables)
    return ctx.plans["v4"]


def attention(attn: v4.Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx, rope: Rope) -> torch.Tensor:
    """v4.Attention.forward on a padded step; the layer's new cache states go to attn.ops.store_latent,
    in cache_specs order (moela/export.py collects them as graph outputs)."""
    step = step_of(ctx)
    (B, S), T = step.positions.shape, x.shape[0]
    q_resid, q, kv = attn.project(x, cos, sin)
    keys, key_pos, states = window(attn, kv.view(B, S, -1), step)
    pos = step.positions[..., None]  # [B, S, 1]
    mask = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= pos) & (key_pos[:, None, :] > pos - attn.window)
    extra = extra_mask = None
    if attn.compressor is not None:
        entries, numbers, new = compress(attn.compressor, x, step, rope)
        states += new
        if attn.kind == "hca":  # every entry this query can see
            keys = torch.cat([keys, entries], dim=1)
            mask = torch.cat([mask, visible(numbers, step.positions, attn.compressor.rate)], dim=2)
        else:  # the entries the indexer picked
            picks, new = indexer_picks(attn.indexer, x, q_resid, cos, sin, step, rope)
            states += new
            extra, extra_mask = take(entries, picks), picks >= 0  # [B, S, k, d], [B, S, k]
    out = attn.ops.sink_attention(q.view(B, S, *q.shape[1:]), keys, mask, extra, extra_mask, attn.attn_sink,
                                  attn.head_dim**-0.5)  # [B, S, H, d]
    for spec, state in zip(attn.cache_specs(), states):
        path, _, name = spec.name.rpartition(".")
        attn.ops.store_latent(getattr(attn.get_submodule(path), name), None, state)
    return attn.output(out.view(T, *q.shape[1:]), cos, sin)


def window(attn: v4.Attention, kv: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(keys [B, W + S, d]: the ring, then the new rows kv [B, S, d]; their positions [B, W + S], negative
    where the ring holds none; [the updated ring [B, W, d]])."""
    W = attn.window
    ring = attn.window_cache[step.slots]  # [B, W, d]
    entry = torch.arange(W, device=kv.device)

    def latest(end: torch.Tensor) -> torch.Tensor:  # [B, W]: the last position < end at each ring entry
        return end[:, None] - 1 - (end[:, None] - 1 - entry + W) % W

    keys, key_pos = torch.cat([ring, kv], dim=1), torch.cat([latest(step.start), step.positions], dim=1)
    after = latest(step.end)
    return keys, key_pos, [take(keys, torch.where(after < step.start[:, None], entry, W + after - step.start[:, None]))]


def compress(comp: v4.Compressor, x: torch.Tensor, step: Step,
             rope: Rope) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """v4.Compressor.forward on a padded step: (the sequence's entries [B, E + K, width], its cached ones
    then the step's K windows; their entry numbers [B, E + K], -1 for block rows not cached yet; [the
    step's entries [B, K, width], the updated pending rows, and (CSA) carry])."""
    (B, S), rate, w = step.positions.shape, comp.rate, comp.width
    sw = comp.wkv.weight.shape[0]  # series * width
    K = (S + rate - 1) // rate  # ceil(S / rate); not -(-S // rate): ONNX rounds an integer division toward zero
    first = step.start // rate  # the window positions[:, 0] falls in
    parts = [comp.pending[step.slots], torch.cat([comp.wkv(x), comp.wgate(x)], -1).view(B, S, 2 * sw)]
    if comp.overlap:  # window first - 1's first series, laid out as rows: [kv, 0, gate, 0]
        carry = comp.carry[step.slots]  # [B, rate, 2 w]
        zero = torch.zeros_like(carry[..., :w])
        parts.insert(0, torch.cat([carry[..., :w], zero, carry[..., w:], zero], dim=-1))
    rows, lead = torch.cat(parts, dim=1), rate if comp.overlap else 0  # [B, lead + rate - 1 + S, 2 sw]

    def row(p: torch.Tensor) -> torch.Tensor:  # positions p [B, m] from (first - 1) * rate on -> their rows
        start = step.start[:, None]
        return take(rows, lead + torch.where(p < start, p - first[:, None] * rate, rate - 1 + p - start))

    arange = lambda n: torch.arange(n, device=x.device)  # noqa: E731
    windows = first[:, None] + arange(K)  # [B, K]
    spans = (windows[..., None] * rate + arange(rate)).view(B, -1)  # [B, K * rate] the windows' positions
    seq = row(spans).view(B, K, rate, 2 * sw)
    kv, gate = seq[..., :sw], seq[..., sw:] + comp.ape  # [B, K, rate, sw] each
    done = step.end // rate  # windows closed after the step
    states = [row(done[:, None] * rate + arange(rate - 1))]  # pending: the open window's rows
    if comp.overlap:  # slots: the previous window's first series, then this window's second series
        prev = row(spans - rate).view(B, K, rate, 2 * sw)
        prev_gate = (prev[..., sw : sw + w] + comp.ape[:, :w]).masked_fill((windows == 0)[..., None, None], float("-inf"))
        kv = torch.cat([prev[..., :w], kv[..., w:]], dim=2)  # [B, K, 2 rate, w]
        gate = torch.cat([prev_gate, gate[..., w:]], dim=2)
        last = row((done[:, None] - 1) * rate + arange(rate))  # the last closed window (may be the carried one)
        states.append(torch.cat([last[..., :w], last[..., sw : sw + w]], dim=-1))
    pooled = comp.norm((kv * gate.softmax(dim=2).to(kv.dtype)).sum(dim=2))  # [B, K, w]
    cos, sin = rope(windows.flatten() * rate)
    entries = v4.rope_tail(comp.ops, pooled.view(B * K, w), cos, sin).view(B, K, w)
    cached = comp.entries[step.tables].view(B, -1, w)  # [B, E, w]: entry e at row e
    number = arange(cached.shape[1])
    numbers = torch.cat([torch.where(number < first[:, None], number, -1), windows], dim=1)
    return torch.cat([cached, entries], dim=1), numbers, [entries, *states]


def indexer_picks(ix: v4.Indexer, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  step: Step, rope: Rope) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """v4.Indexer.forward on a padded step: (each query's topk entries [B, S, topk], indices into compress's
    entries, -1 where it sees fewer; the indexer compressor's new states)."""
    (B, S), (keys, numbers, states) = step.positions.shape, compress(ix.compressor, x, step, rope)
    q, weights = ix.queries(x, q_resid, cos, sin)
    scores = ix.ops.index_scores(q.view(B, S, *q.shape[1:]), weights.view(B, S, -1), keys, ix.head_dim**-0.5)
    scores = scores.masked_fill(~visible(numbers, step.positions, ix.rate), float("-inf"))  # [B, S, E + K]
    return padded_topk(scores, ix.topk), states


def visible(numbers: torch.Tensor, positions: torch.Tensor, rate: int) -> torch.Tensor:
    """[B, S, E]: the entries (numbers [B, E]) each query at positions [B, S] may see: those its position closed."""
    return (numbers[:, None, :] >= 0) & (numbers[:, None, :] < (positions[..., None] + 1) // rate)


def take(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [B, n, w] at index [B, ...] (clamped into range) -> [B, ..., w]."""
    B, n, w = rows.shape
    flat = index.clamp(0, n - 1).reshape(B, -1)
    return rows.gather(1, flat[..., None].expand(-1, -1, w)).view(*index.shape, w)
