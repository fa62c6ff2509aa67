"""BlockManager: the paged latent cache's bookkeeping, with prefix caching.

    bm = BlockManager(num_blocks=1024, block_size=64, enable_prefix_caching=True)
    cached = bm.allocate_prefix(seq)        # share the full prompt blocks already in the cache
    ok = bm.ensure(seq, n_tokens)           # give seq enough blocks for its first n_tokens
    bm.commit(seq)                          # publish its full, computed blocks under their hash chain
    bm.free(seq)                            # drop its references (cached blocks stay until evicted)

A full block is keyed by a hash chain over all tokens up to its end, so equal keys mean equal
prefixes. Freed blocks that hold a key wait in an LRU pool and are reused by later requests with
the same prefix; they are evicted (oldest first) only when no never-keyed block is left.
"""

import hashlib
from collections import OrderedDict, deque

import numpy as np

from moela.engine.sequence import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def cache_bytes_per_token(latent_dim: int, num_layers: int, dtype_bytes: int) -> int:
    return latent_dim * num_layers * dtype_bytes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self.free_plain: deque[int] = deque(range(num_blocks))
        self.free_keyed: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first

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
        """Give seq blocks for its first n_tokens; False (nothing allocated) if too few are free."""
        need = self.blocks_needed(seq, n_tokens)
        if need > self.num_free:
            return False
        seq.block_table.extend(self._take() for _ in range(need))
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
        seq.block_table, seq.block_keys, seq.num_computed = [], [], 0
