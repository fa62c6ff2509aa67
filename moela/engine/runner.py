"""Runner: the device boundary. Packs a scheduled batch into one StepContext and runs one forward.

    runner = Runner(model, num_blocks=512, block_size=64)
    logits = runner.execute(batch)       # batch: [(seq, n_new_tokens)] from the scheduler

Prefill chunks and decode tokens of every scheduled sequence go through the model together: one
forward per step. Logits are computed only for the rows that are sampled (a sequence's last token
when its chunk reaches the end of what it has) and, for prompt logprobs, every prompt row.
"""

import torch

from moela.engine.sequence import Sequence
from moela.model import StepContext, Transformer


class Runner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.model, self.block_size = model, block_size
        w = model.embed.weight
        self.caches = [torch.zeros(num_blocks, block_size, model.cfg.latent_dim, dtype=w.dtype, device=w.device)
                       for _ in range(model.cfg.num_hidden_layers)]
        model.attach_cache(self.caches)

    def context(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, StepContext]:
        tokens, positions, slots = [], [], []
        max_blocks = max(len(seq.block_table) for seq, _ in batch)
        tables = torch.zeros(len(batch), max_blocks, dtype=torch.long)
        for b, (seq, n) in enumerate(batch):
            start = seq.num_computed
            tokens.extend(seq.token_ids[start : start + n])
            pos = torch.arange(start, start + n)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            tables[b, : len(table)] = table
            positions.append(pos)
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
        ctx = StepContext(positions=torch.cat(positions), q_lens=[n for _, n in batch],
                          kv_lens=[seq.num_computed + n for seq, n in batch], slot_mapping=torch.cat(slots),
                          block_tables=tables)
        return torch.tensor(tokens, dtype=torch.long), ctx

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]], all_rows: set[int] = frozenset()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return (logits of each batch entry's last row [B, V], {b: logits of all of b's rows} for b in all_rows)."""
        tokens, ctx = self.context(batch)
        hidden = self.model(tokens, ctx.positions, ctx)
        last = torch.tensor(ctx.q_starts[1:]) - 1
        logits = self.model.logits(hidden[last]).float()
        every = {b: self.model.logits(hidden[ctx.q_starts[b] : ctx.q_starts[b + 1]]).float() for b in all_rows}
        return logits, every
