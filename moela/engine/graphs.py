"""Decode steps replayed from graphs captured once per batch size (CUDA graphs), with an eager fallback.

    runner.capture_graphs(sizes=(1, 2, 4, 8), width=blocks_per_sequence, scratch_block=num_blocks - 1)
    logits, _ = runner.execute(batch)      # a decode-only batch of <= 8 sequences replays; others run eagerly

A graph replays the kernels it recorded, on the buffers it recorded them with. For each size the runner
captures one forward of a batch of padding sequences; a decode step of n sequences is then built as usual
(StepContext, the backend's plan), padded to the next captured size with sequences of one token whose
cache row lies in a scratch block that no sequence owns, copied into the captured buffers, and replayed.
A graph can only replay a step whose plans equal the captured ones in everything but tensor values (the
triton backend's decode plans depend on the batch size alone; the reference's on the longest context);
any other step runs eagerly, as do prefills, mixed steps, larger batches and steps that want prompt logits.
Padding tokens are routed like real ones, so the expert load counters include them.
"""

import functools
from collections.abc import Callable

import torch

from moela.engine.sampler import SamplingParams
from moela.engine.sequence import Sequence
from moela.models import StepContext


def graph_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class CudaGraph:
    """One torch.cuda.CUDAGraph: capture(fn) warms fn up on a side stream, records it and returns its outputs."""

    def __init__(self, pool):
        self.pool, self.graph = pool, torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # Triton compiles, cuBLAS picks its kernels, the allocator warms up: none of it may be recorded
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def cuda_graph_factory() -> Callable[[], CudaGraph]:
    pool = torch.cuda.graph_pool_handle()  # every size shares one pool: only one replays at a time
    return lambda: CudaGraph(pool)


class DecodeGraphs:
    def __init__(self, runner, sizes: list[int], width: int, scratch_block: int, new_graph: Callable):
        self.runner, self.width = runner, width
        self.pad = Sequence("padding", 0, [0], 1, SamplingParams(), None, None, block_table=[scratch_block])
        self.captured: dict[int, tuple] = {}
        for size in sorted(sizes, reverse=True):  # largest first: the smaller ones reuse its memory
            tokens, ctx = runner.context([(self.pad, 1)] * size, width)
            graph = new_graph()
            logits = graph.capture(functools.partial(self.forward, tokens, ctx))
            self.captured[size] = (graph, tokens, ctx, logits)

    def forward(self, tokens: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        model = self.runner.model
        return model.logits(model(tokens, ctx.positions, ctx)).float()  # one row per sequence: all are last rows

    def run(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor | None:
        """Logits [len(batch), vocab] from a replay, or None when this step must run eagerly."""
        n = len(batch)
        fits = [s for s in self.captured if s >= n]
        if not fits or any(q != 1 for _, q in batch):
            return None
        graph, tokens, ctx, logits = self.captured[min(fits)]
        step_tokens, step_ctx = self.runner.context(batch + [(self.pad, 1)] * (min(fits) - n), self.width)
        if not same_layout(ctx.plans, step_ctx.plans):
            return None
        for static, new in ((tokens, step_tokens), (ctx.positions, step_ctx.positions),
                            (ctx.slot_mapping, step_ctx.slot_mapping), (ctx.block_tables, step_ctx.block_tables)):
            static.copy_(new)
        copy_values(ctx.plans, step_ctx.plans)
        graph.replay()
        return logits[:n].clone()  # the next replay overwrites the captured output


def same_layout(captured, new) -> bool:
    """Whether two plans agree in everything but tensor values (structure, shapes, dtypes, plain values)."""
    if isinstance(captured, torch.Tensor) or isinstance(new, torch.Tensor):
        return isinstance(captured, torch.Tensor) and isinstance(new, torch.Tensor) and \
            captured.shape == new.shape and captured.dtype == new.dtype
    if isinstance(captured, dict):
        return isinstance(new, dict) and captured.keys() == new.keys() and all(same_layout(captured[k], new[k]) for k in captured)
    if isinstance(captured, (list, tuple)):
        return type(captured) is type(new) and len(captured) == len(new) and all(map(same_layout, captured, new))
    return captured == new


def copy_values(captured, new) -> None:
    """Copy every tensor of `new` into the same place of `captured` (same_layout holds)."""
    if isinstance(captured, torch.Tensor):
        captured.copy_(new)
    elif isinstance(captured, dict):
        for key in captured:
            copy_values(captured[key], new[key])
    elif isinstance(captured, (list, tuple)):
        for a, b in zip(captured, new):
            copy_values(a, b)
