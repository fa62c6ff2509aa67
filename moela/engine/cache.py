"""The cache: its layout from the model's per-layer specs (CacheLayout: sizes, allocation, the
start-up log) and its bookkeeping (BlockManager: blocks, slots, prefix caching).

    layout = CacheLayout(model.cache_specs(), torch.bfloat16, block_size=64)
    num_blocks = layout.num_blocks(budget_bytes, num_slots)
    caches = layout.allocate(num_blocks, num_slots, device)    # per layer: {spec name: tensor}
    bm = BlockManager(num_blocks, block_size=64, enable_prefix_caching=True, num_slots=num_slots)
    cached = bm.allocate_prefix(seq)        # share the full prompt blocks already in the cache
    ok = bm.ensure(seq, n_tokens)           # give seq enough blocks for its first n_tokens (and a slot)
    bm.commit(seq)                          # publish its full, computed blocks under their hash chain
    bm.free(seq)                            # drop its references (cached blocks stay until evicted)

Every paged kind grows with the token count at its fixed ratio, so one block table per sequence
serves them all: block b holds block_size tokens' entries of every paged kind of every layer. Fixed
kinds (a sliding window, carried-over state) live in per-sequence slots instead, one per running
sequence. A full block is keyed by a hash chain over all tokens up to its end, so equal keys mean
equal prefixes. Freed blocks that hold a key wait in an LRU pool and are reused by later requests
with the same prefix; they are evicted (oldest first) only when no never-keyed block is left.
"""

import hashlib
import math
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass

import numpy as np
import torch

from moela.engine.sequence import Sequence
from moela.models.context import CacheSpec


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class CacheLayout:
    """The cache a model's specs ask for ([layer][spec]), in one dtype, block_size tokens per block."""

    specs: list[list[CacheSpec]]
    dtype: torch.dtype
    block_size: int

    def __post_init__(self) -> None:
        for spec in self.all_specs():
            if spec.paged and self.block_size % spec.tokens_per_entry:
                raise ValueError(f"block_size = {self.block_size} is invalid for this model: its {spec.kind!r} cache "
                                 f"keeps one entry per {spec.tokens_per_entry} tokens, so block_size must be a multiple")

    @classmethod
    def fit(cls, specs: list[list[CacheSpec]], dtype: torch.dtype, block_size: int) -> "CacheLayout":
        """The layout with block_size rounded up to hold whole entries of every compressed kind."""
        step = math.lcm(*(s.tokens_per_entry for layer in specs for s in layer if s.paged))
        return cls(specs, dtype, -(-block_size // step) * step)

    def all_specs(self) -> list[CacheSpec]:
        return [spec for layer in self.specs for spec in layer]

    @property
    def bytes_per_block(self) -> int:
        return sum(self.block_size // s.tokens_per_entry * s.entry_bytes(self.dtype) for s in self.all_specs() if s.paged)

    @property
    def bytes_per_token(self) -> int | float:
        per_token = self.bytes_per_block / self.block_size
        return int(per_token) if per_token.is_integer() else per_token

    @property
    def fixed_bytes_per_sequence(self) -> int:
        return sum(s.fixed_bytes(self.dtype) for s in self.all_specs())

    def num_blocks(self, budget: int, num_slots: int) -> int:
        """Blocks that fit in `budget` bytes once the slots of the fixed kinds are set aside."""
        return (budget - num_slots * self.fixed_bytes_per_sequence) // self.bytes_per_block

    def allocate(self, num_blocks: int, num_slots: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        def shape(s: CacheSpec) -> tuple[int, int, int]:
            if s.paged:
                return num_blocks, self.block_size // s.tokens_per_entry, s.width
            return num_slots, s.entries_per_sequence, s.width

        return [{s.name: torch.zeros(shape(s), dtype=s.dtype or self.dtype, device=device) for s in layer}
                for layer in self.specs]

    def describe(self) -> list[str]:
        """One line per cache kind: layers, values per entry, bytes per token and fixed bytes per sequence."""
        kinds: dict[str, list[CacheSpec]] = defaultdict(list)
        for spec in self.all_specs():
            kinds[spec.kind].append(spec)
        return [f"{kind}: {len(specs)} layers x {specs[0].width} values, "
                f"{sum(s.bytes_per_token(self.dtype) for s in specs):,.0f} bytes/token, "
                f"{sum(s.fixed_bytes(self.dtype) for s in specs):,} fixed bytes/sequence" for kind, specs in kinds.items()]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_slots: int = 0):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self.free_plain: deque[int] = deque(range(num_blocks))
        self.free_keyed: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.free_slots: deque[int] = deque(range(num_slots))  # for models with fixed cache kinds
        self.num_slots = num_slots

    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.free_keyed)

    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def _take(self) -> int:
        if self.free_plain:
            block = self.free_plain.popleft()
        else:
            block, _ = self.free_keyed.popitem(last=False)
            del self.by_key[self.key[block]]
            self.key[block] = None
        self.ref[block] = 1
        return block

    def _share(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free_keyed[block]
        self.ref[block] += 1

    def allocate_prefix(self, seq: Sequence) -> int:
        """Attach the longest cached run of seq's full blocks; return how many tokens it covers.

        At least one token is always left to compute, since the step needs its logits.
        """
        assert not seq.block_table and seq.num_computed == 0
        n_tokens = len(seq.token_ids)
        if not self.prefix_caching:
            return 0
        parent = b""
        for start in range(0, n_tokens - 1 - (self.block_size - 1), self.block_size):
            key = block_hash(parent, seq.token_ids[start : start + self.block_size])
            block = self.by_key.get(key)
            if block is None:
                break
            self._share(block)
            seq.block_table.append(block)
            seq.block_keys.append(key)
            parent = key
        seq.num_computed = len(seq.block_table) * self.block_size
        return seq.num_computed

    def blocks_needed(self, seq: Sequence, n_tokens: int) -> int:
        return max(0, -(-n_tokens // self.block_size) - len(seq.block_table))

    def ensure(self, seq: Sequence, n_tokens: int) -> bool:
        """Give seq blocks for its first n_tokens, and a slot if the model has fixed kinds; False (nothing
        allocated) if too few are free."""
        need = self.blocks_needed(seq, n_tokens)
        want_slot = self.num_slots > 0 and seq.slot is None
        if need > self.num_free or (want_slot and not self.free_slots):
            return False
        seq.block_table.extend(self._take() for _ in range(need))
        if want_slot:
            seq.slot = self.free_slots.popleft()
        return True

    def commit(self, seq: Sequence) -> None:
        """Key seq's newly completed blocks so later requests can share them."""
        if not self.prefix_caching:
            return
        while (len(seq.block_keys) + 1) * self.block_size <= seq.num_computed:
            i = len(seq.block_keys)
            parent = seq.block_keys[-1] if seq.block_keys else b""
            key = block_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_keys.append(key)
            block = seq.block_table[i]
            if key not in self.by_key and self.key[block] is None:
                self.by_key[key], self.key[block] = block, key

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # the prefix's head is freed last, so evicted last
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if self.key[block] is None:
                    self.free_plain.append(block)
                else:
                    self.free_keyed[block] = None
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
        seq.block_table, seq.block_keys, seq.num_computed, seq.slot = [], [], 0, None
