"""Paged latent-cache ops the model calls, in plain PyTorch (the reference backend).

The cache of one MLA layer is [num_blocks, block_size, latent_dim]; token p of a sequence lives in
block block_table[p // block_size], row p % block_size. `slot_mapping` gives each new token's flat
row (block * block_size + row).
"""

from collections.abc import Iterator

import torch


def store_latent(cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor) -> None:
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent.to(cache.dtype))


def gather_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache rows of positions 0..length-1 of one sequence."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size


def latent_batches(cache: torch.Tensor | None, latent: torch.Tensor, ctx, seqs: list[int]) -> Iterator[tuple]:
    """Yield (rows [b, n], keys [b, s, latent_dim], mask [b, n, s]) for the absorbed path.

    Single-token (decode) sequences are batched together, padded to the longest context; other
    sequences (chunks after a cached prefix) come one at a time. rows holds each query's index in
    the packed token stream (-1 for padding); mask is True where a query may attend a key.
    """
    decodes = [i for i in seqs if ctx.q_lens[i] == 1]
    groups = ([decodes] if decodes else []) + [[i] for i in seqs if ctx.q_lens[i] != 1]
    for group in groups:
        n, s = max(ctx.q_lens[i] for i in group), max(ctx.kv_lens[i] for i in group)
        rows = torch.full((len(group), n), -1, dtype=torch.long, device=latent.device)
        slots = torch.zeros((len(group), s), dtype=torch.long, device=latent.device)
        mask = torch.zeros((len(group), n, s), dtype=torch.bool, device=latent.device)
        for b, i in enumerate(group):
            q_len, kv_len, start = ctx.q_lens[i], ctx.kv_lens[i], ctx.q_starts[i]
            rows[b, :q_len] = torch.arange(start, start + q_len)
            q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
            mask[b, :q_len, :kv_len] = torch.arange(kv_len)[None, :] <= q_pos
            if cache is not None:
                slots[b, :kv_len] = gather_slots(ctx.block_tables[i], kv_len, cache.shape[1])
        if cache is None:  # no cache: each sequence attends only its own new tokens
            assert all(ctx.q_lens[i] == ctx.kv_lens[i] for i in group), "a cached prefix needs a cache"
            keys = latent[rows.clamp(min=0)]
        else:
            keys = cache.view(-1, cache.shape[-1])[slots]
        yield rows, keys, mask
