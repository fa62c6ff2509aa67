"""Runner: the device boundary. Packs a scheduled batch into one StepContext and runs one forward.

    runner = Runner(model, CacheLayout(model.cache_specs(), dtype, 64), num_blocks=512, backend=backend)
    logits, prompt_logits = runner.execute(batch)       # batch: [(seq, n_new_tokens)] from the scheduler

Prefill chunks and decode tokens of every scheduled sequence go through the model together: one
forward per step. Logits are computed only for the rows that are sampled (a sequence's last token
when its chunk reaches the end of what it has) and, for prompt logprobs, every prompt row.

Every tensor of a step is built on the host from the scheduler's integers and copied to the model's
device before the forward, the backend's index plans included (`plan`), so the reference backend's
layer loop never waits on the device (bf16 weights; see moela/ops/reference.py for the one exception). What still
synchronises, once per step and outside the layer loop: the sampled token ids (and the logprobs
asked for) come back to the host, which needs them to detokenize, stop and schedule the next step.
Inside the loop, only backends whose MoE kernel runs one matmul per expert read the per-expert token
counts on the host (the CPU backend's oneDNN packs: one small read per MoE layer); the reference's
grouped matmul takes its offsets on the device. With `capture_graphs` (EngineConfig.cuda_graphs), decode
steps replay CUDA graphs (moela/engine/graphs.py).
"""

from collections.abc import Callable

import torch

from moela import ops
from moela.engine.cache import CacheLayout
from moela.engine.graphs import DecodeGraphs, cuda_graph_factory
from moela.engine.sequence import Sequence
from moela.models import StepContext


class Runner:
    def __init__(self, model: torch.nn.Module, layout: CacheLayout, num_blocks: int, num_slots: int = 0,
                 backend: ops.Backend = ops.REFERENCE):
        self.model, self.block_size, self.backend = model, layout.block_size, backend
        self.device = model.embed.weight.device
        self.caches = layout.allocate(num_blocks, num_slots, self.device)
        model.attach_cache(self.caches)
        self.graphs: DecodeGraphs | None = None

    @torch.inference_mode()
    def capture_graphs(self, sizes: list[int], width: int, scratch_block: int, new_graph: Callable | None = None) -> None:
        """Capture the decode step for each batch size (moela/engine/graphs.py): block tables `width` blocks
        wide, padding rows cached in `scratch_block`, which no sequence may own; CUDA graphs unless new_graph says."""
        self.graphs = DecodeGraphs(self, sizes, width, scratch_block, new_graph or cuda_graph_factory())

    def context(self, batch: list[tuple[Sequence, int]], width: int | None = None) -> tuple[torch.Tensor, StepContext]:
        tokens, positions, slots, bs = [], [], [], self.block_size
        width = width or max(len(seq.block_table) for seq, _ in batch)
        for seq, n in batch:
            start = seq.num_computed
            tokens += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in batch]
        on_device = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        seq_slots = [seq.slot for seq, _ in batch]
        ctx = StepContext(positions=on_device(positions), q_lens=[n for _, n in batch],
                          kv_lens=[seq.num_computed + n for seq, n in batch], slot_mapping=on_device(slots),
                          block_tables=on_device(tables), seq_slots=None if None in seq_slots else on_device(seq_slots),
                          block_size=bs, naive_prefill=self.model.naive_prefill)
        self.backend.plan(ctx)
        return on_device(tokens), ctx

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]], all_rows: set[int] = frozenset()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Return (logits of each batch entry's last row [B, V], {b: logits of all of b's rows} for b in all_rows)."""
        if self.graphs is not None and not all_rows and (logits := self.graphs.run(batch)) is not None:
            return logits, {}
        tokens, ctx = self.context(batch)
        last = torch.tensor(ctx.q_starts[1:], device=self.device) - 1
        hidden = self.model(tokens, ctx.positions, ctx)
        logits = self.model.logits(hidden[last]).float()
        every = {b: self.model.logits(hidden[ctx.q_starts[b] : ctx.q_starts[b + 1]]).float() for b in all_rows}
        return logits, every
