"""Scheduler: continuous batching with chunked prefill under a token budget, preemption by recompute.

    sched = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048), block_manager)
    sched.add(seq)
    batch = sched.schedule()        # [(seq, n_new_tokens)]: decodes first, then prefill chunks
    ...run the model, append sampled tokens...
    sched.finish(seq)               # frees its blocks at once

Running sequences are served first, decodes (one token each, plus its draft tokens under speculative
decoding) before prefill chunks so a long prompt
never stalls them, then waiting ones in arrival order while the budget and free blocks last.
When blocks run out, the newest running sequence not yet scheduled in this step is preempted: its
blocks are freed and it goes back to the head of the queue to be recomputed (its tokens so far are
kept, so greedy output is unchanged).
"""

from collections import deque

from moela.engine.config import SchedulerConfig
from moela.engine.cache import BlockManager
from moela.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found in the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch = self.cfg.max_num_batched_tokens, []
        decodes_first = sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed > 1)
        for seq in decodes_first:
            if budget <= 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this step
                continue
            n = min(len(seq.token_ids) + len(seq.spec_tokens) - seq.num_computed, budget)
            while seq.status == Status.RUNNING and not self.blocks.ensure(seq, seq.num_computed + n):
                scheduled = {id(s) for s, _ in batch}
                self.preempt(next(s for s in reversed(self.running) if id(s) not in scheduled))
            if seq.status == Status.RUNNING:
                batch.append((seq, n))
                budget -= n
        return batch + self._admit(budget)

    def _admit(self, budget: int) -> list[tuple[Sequence, int]]:
        batch = []
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
                break
            if not self._ready(seq):
                continue
            cached = 0 if seq.params.prompt_logprobs is not None else self.blocks.allocate_prefix(seq)
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self.blocks.ensure(seq, seq.num_computed + n):
                self.blocks.free(seq)
                break
            self.prefix_queries += len(seq.token_ids)
            self.prefix_hits += cached
            seq.num_cached_prompt = min(cached, seq.num_prompt_tokens)
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _ready(self, seq: Sequence) -> bool:
        """A request's extra samples wait until its first sample has prefilled, to share its blocks."""
        first = seq.first_sibling
        return first is None or first.finished or (first.status == Status.RUNNING and not first.in_prefill)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status, seq.spec_tokens = Status.WAITING, []
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
