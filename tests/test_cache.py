"""BlockManager: allocation, prefix sharing by hash chain, LRU eviction, no leaks."""

import random

from moela.engine.cache import BlockManager
from moela.engine.sequence import Sequence
from moela.engine.sampler import SamplingParams


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, list(tokens), len(tokens), SamplingParams(), None, None)


def run(bm: BlockManager, s: Sequence) -> int:
    """Admit s like the scheduler does and mark its prompt computed."""
    cached = bm.allocate_prefix(s)
    assert bm.ensure(s, len(s.token_ids))
    s.num_computed = len(s.token_ids)
    bm.commit(s)
    return cached


def test_prefix_blocks_are_shared_and_one_token_is_always_computed():
    bm = BlockManager(16, 4)
    a = seq(list(range(10)))
    assert run(bm, a) == 0 and len(a.block_table) == 3
    b = seq(list(range(10)) + [99])
    assert run(bm, b) == 8 and b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    exact = seq(list(range(8)))  # both blocks cached, but the last token must be recomputed for its logits
    assert run(bm, exact) == 4
    other = seq([7] + list(range(1, 10)))  # differs in the first block: the chain breaks at once
    assert run(bm, other) == 0


def test_freed_keyed_blocks_are_reused_and_evicted_last():
    bm = BlockManager(4, 4)
    a = seq(list(range(8)) + [50])
    run(bm, a)
    bm.free(a)
    assert bm.num_free == 4
    b = seq(list(range(8)) + [51])
    assert run(bm, b) == 8  # served from freed blocks
    bm.free(b)
    c = seq(list(range(100, 116)))  # needs all 4 blocks: evicts the keyed ones
    assert run(bm, c) == 0 and bm.num_free == 0
    bm.free(c)
    assert run(bm, seq(list(range(8)) + [52])) == 0  # the old prefix is gone


def test_plain_blocks_are_used_before_evicting_cached_ones():
    bm = BlockManager(6, 4)
    a = seq(list(range(9)))
    run(bm, a)
    bm.free(a)
    run(bm, seq(list(range(200, 208))))  # two blocks: must come from the never-keyed pool
    assert run(bm, seq(list(range(9)))) == 8


def test_ensure_fails_without_side_effects():
    bm = BlockManager(2, 4)
    s = seq(list(range(12)))
    assert not bm.ensure(s, 12) and s.block_table == [] and bm.num_free == 2


def test_trim_frees_the_blocks_past_a_length():
    bm = BlockManager(8, 4)
    s = seq(list(range(6)))
    run(bm, s)
    assert bm.ensure(s, 14) and len(s.block_table) == 4  # room for 8 draft tokens
    bm.trim(s, 9)  # 3 of them kept: blocks for 9 tokens stay
    assert len(s.block_table) == 3 and bm.num_free == 5
    bm.free(s)
    assert bm.num_free == 8


def test_no_leak_under_random_traffic():
    rng = random.Random(0)
    bm = BlockManager(32, 4)
    live = []
    for _ in range(500):
        if live and rng.random() < 0.5:
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        s = seq([rng.randrange(3) for _ in range(rng.randrange(1, 20))])
        bm.allocate_prefix(s)
        if bm.ensure(s, len(s.token_ids)):
            s.num_computed = len(s.token_ids)
            bm.commit(s)
            live.append(s)
        else:
            bm.free(s)
    for s in live:
        bm.free(s)
    assert bm.num_free == 32 and all(r == 0 for r in bm.ref)


def test_layout_of_mla_latent_caches_and_its_allocation():
    import torch

    from moela.engine.cache import CacheLayout
    from moela.models import CacheSpec

    specs = [[CacheSpec("kv_cache", "latent", 576)] for _ in range(3)]
    layout = CacheLayout(specs, torch.bfloat16, block_size=16)
    assert layout.bytes_per_token == 576 * 3 * 2 and layout.bytes_per_block == 576 * 3 * 2 * 16
    assert layout.fixed_bytes_per_sequence == 0 and layout.num_blocks(10 * layout.bytes_per_block + 5, 0) == 10
    caches = layout.allocate(10, 0, torch.device("cpu"))
    assert len(caches) == 3 and caches[0]["kv_cache"].shape == (10, 16, 576) and caches[0]["kv_cache"].dtype == torch.bfloat16
    assert layout.describe() == ["latent: 3 layers x 576 values, 3,456 bytes/token, 0 fixed bytes/sequence"]


def test_slots_for_fixed_kinds_are_given_and_taken_back():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False, num_slots=2)
    a, b, c = (Sequence(str(i), 0, [1] * 5, 5, SamplingParams(), None, None) for i in range(3))
    assert bm.ensure(a, 5) and bm.ensure(b, 3) and (a.slot, b.slot) == (0, 1)
    assert not bm.ensure(c, 1) and c.slot is None and c.block_table == []  # no slot left: nothing allocated
    bm.free(a)
    assert bm.ensure(c, 1) and c.slot == 0 and a.slot is None
