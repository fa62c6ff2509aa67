"""Scheduler without a model: budgets, decodes before prefill chunks, preemption, sibling gating."""

from moela.engine.cache import BlockManager
from moela.engine.scheduler import Scheduler, SchedulerConfig
from moela.engine.sequence import Sequence, Status
from moela.engine.sampler import SamplingParams


def seq(n_prompt: int, name: str = "r", first: Sequence | None = None) -> Sequence:
    return Sequence(name, 0, list(range(2, 2 + n_prompt)), n_prompt, SamplingParams(), None, None, first_sibling=first)


def advance(batch) -> None:
    """Pretend the model ran: mark tokens computed and append a sampled token where a row was sampled."""
    for s, n in batch:
        s.num_computed += n
        if s.num_computed == len(s.token_ids):
            s.token_ids.append(7)


def test_chunked_prefill_under_the_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(64, 4))
    long = seq(25)
    sched.add(long)
    sizes = []
    while long.in_prefill:
        batch = sched.schedule()
        sizes.append([n for _, n in batch])
        advance(batch)
    assert sizes == [[10], [10], [5]]


def test_decodes_are_scheduled_before_prefill_chunks():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8), BlockManager(64, 4))
    prefilling, decoding = seq(40, "p"), seq(3, "d")
    for s in (prefilling, decoding):
        s.status = Status.RUNNING
        sched.running.append(s)
    decoding.num_computed = 3
    decoding.token_ids.append(9)  # one token to decode
    sched.blocks.ensure(decoding, 4)
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in batch] == [("d", 1), ("p", 7)]


def test_preemption_frees_the_newest_and_requeues_it_first():
    blocks = BlockManager(4, 4)  # 16 tokens in all
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), blocks)
    a, b = seq(6, "a"), seq(6, "b")
    sched.add(a)
    sched.add(b)
    advance(sched.schedule())  # both prefilled: 2 blocks each, all 4 used
    for _ in range(2):
        advance(sched.schedule())  # each decodes: 8 tokens computed (2 full blocks), a 9th sampled
    batch = sched.schedule()  # a needs a 3rd block for its 9th token: b, the newest, is preempted
    assert [s.request_id for s, _ in batch] == ["a"] and b.status == Status.WAITING
    assert sched.waiting[0] is b and b.num_computed == 0 and b.block_table == [] and sched.num_preemptions == 1
    assert len(b.token_ids) == 9  # 6 prompt + 3 generated tokens are kept, to be recomputed


def test_samples_wait_for_the_first_sample_prefill():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(16, 4))
    first = seq(9, "r")
    second = seq(9, "r", first=first)
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()
    assert [s for s, _ in batch] == [first]
    advance(batch)
    sched.blocks.commit(first)
    batch = sched.schedule()
    assert second in [s for s, _ in batch] and second.num_cached_prompt == 8  # two shared full blocks


def test_finish_and_max_num_seqs():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), BlockManager(16, 4))
    seqs = [seq(3, str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert [s for s, _ in sched.schedule()] == seqs[:2]
    sched.finish(seqs[0])
    assert seqs[0].status == Status.FINISHED and seqs[0].block_table == []
    assert seqs[2] in [s for s, _ in sched.schedule()]
