"""What a forward needs beyond the tokens: one step's batch layout (StepContext), and what each
attention layer caches (CacheSpec), from which the engine sizes and allocates the cache.

    ctx = StepContext.prefill([5, 3])                 # two packed prompts, no cache
    hidden = model(tokens, ctx.positions, ctx)
    specs = model.cache_specs()                       # [[CacheSpec("kv_cache", "latent", 576)], ...] per layer

The runner builds a StepContext once per step with every tensor on the model's device; the lengths
stay on the host (the scheduler knows them), so no layer has to read a device tensor to plan.
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CacheSpec:
    """One cache of one attention layer: `name` is the layer attribute the engine sets to its tensor.

    Paged kinds grow with the context: one entry of `width` values per `tokens_per_entry` tokens, in
    the blocks of the sequence's block table ([num_blocks, block_size // tokens_per_entry, width]).
    Fixed kinds (entries_per_sequence > 0: a sliding-window ring, a compressor's carried-over state)
    hold that many entries per running sequence, in the sequence's slot ([num_slots, entries, width]).
    """

    name: str
    kind: str  # "latent": MLA's [c_KV | k_pe] (V2, V3); later models add kinds of their own
    width: int
    tokens_per_entry: int = 1
    entries_per_sequence: int = 0
    dtype: torch.dtype | None = None  # None: the model's dtype

    @property
    def paged(self) -> bool:
        return self.entries_per_sequence == 0

    def entry_bytes(self, model_dtype: torch.dtype) -> int:
        return self.width * (self.dtype or model_dtype).itemsize

    def bytes_per_token(self, model_dtype: torch.dtype) -> float:
        return self.entry_bytes(model_dtype) / self.tokens_per_entry if self.paged else 0.0

    def fixed_bytes(self, model_dtype: torch.dtype) -> int:
        """Bytes each running sequence holds whatever its length."""
        return self.entries_per_sequence * self.entry_bytes(model_dtype)


@dataclass
class StepContext:
    """One step's batch: sequences packed back to back in the token stream, each with q_len new tokens."""

    positions: torch.Tensor  # [T] int64, absolute position of each token
    q_lens: list[int]  # new tokens per sequence
    kv_lens: list[int]  # context length per sequence after this step (cached + new)
    slot_mapping: torch.Tensor | None = None  # [T] flat cache row of each new token (paged kinds)
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int64
    seq_slots: torch.Tensor | None = None  # [B] each sequence's slot in the fixed kinds' buffers
    block_size: int | None = None  # tokens per cache block (None: no cache)
    naive_prefill: bool = True  # decompress K/V for prompts with no cached prefix
    q_starts: list[int] = field(init=False)  # [B + 1] where each sequence's tokens start
    plans: dict = field(default_factory=dict)  # index plans the ops build once per step and every layer reuses

    def __post_init__(self) -> None:
        self.q_starts = [0]
        for n in self.q_lens:
            self.q_starts.append(self.q_starts[-1] + n)

    @classmethod
    def prefill(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "StepContext":
        """Full sequences with no cache: training, scoring, or a first prefill."""
        positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])
        return cls(positions=positions, q_lens=list(seq_lens), kv_lens=list(seq_lens))

    @classmethod
    def padded(cls, positions: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> "StepContext":
        """A traced graph's step: B sequences of S new rows each (positions [B, S], flattened here), every
        one reading the cache, which holds what came before positions[:, 0]. The lengths live only in the
        tensors (q_lens and kv_lens stay empty), so only ops that read them run it: moela/ops/export.py."""
        return cls(positions=positions.flatten(), q_lens=[], kv_lens=[], block_tables=block_tables,
                   block_size=block_size, naive_prefill=False)

    def split(self) -> tuple[list[int], list[int]]:
        """(naive, absorbed) sequence indices: a prompt with nothing cached before it (and more than one
        token) attends its own tokens with K/V decompressed; every other sequence reads the latent cache."""
        key = ("split", self.naive_prefill)
        if key not in self.plans:
            naive = [i for i, (q, kv) in enumerate(zip(self.q_lens, self.kv_lens)) if self.naive_prefill and q == kv > 1]
            absorbed = sorted(set(range(len(self.q_lens))) - set(naive))
            self.plans[key] = (naive, absorbed)
        return self.plans[key]

    def token_seqs(self) -> torch.Tensor:
        """[T] which sequence each token belongs to, on the device (built once per step)."""
        if "token_seqs" not in self.plans:
            seqs = [b for b, n in enumerate(self.q_lens) for _ in range(n)]
            self.plans["token_seqs"] = torch.tensor(seqs, dtype=torch.long, device=self.positions.device)
        return self.plans["token_seqs"]

    def token_starts(self) -> torch.Tensor:
        """[T] the row where each token's sequence starts in the packed stream (built once per step)."""
        if "token_starts" not in self.plans:
            starts = torch.tensor(self.q_starts[:-1], device=self.positions.device)
            self.plans["token_starts"] = starts[self.token_seqs()]
        return self.plans["token_starts"]

    def absorbed_rows(self) -> torch.Tensor:
        """[T_absorbed] token rows of the absorbed sequences, on the device (built once per step)."""
        if "absorbed_rows" not in self.plans:
            rows = [self.q_starts[i] + j for i in self.split()[1] for j in range(self.q_lens[i])]
            self.plans["absorbed_rows"] = torch.tensor(rows, dtype=torch.long, device=self.positions.device)
        return self.plans["absorbed_rows"]
