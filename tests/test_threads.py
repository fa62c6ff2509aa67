"""threads: the starting count follows the idle cores; the governor drops a thread when ours wait for a
CPU and takes one back when a core stays idle (readings faked; bench/threads.py measures the real thing)."""

import argparse

import pytest
import torch

from moela import threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeMachine:
    def __init__(self, monkeypatch, cores: int = 2):
        self.now, self.idle, self.waited, self.ticks_per_s = 100.0, 0, 0, 100
        monkeypatch.setattr(threads, "cpu_set", lambda: list(range(cores)))
        monkeypatch.setattr(threads, "_idle_jiffies", lambda cpus: self.idle)
        monkeypatch.setattr(threads, "_run_queue_ns", lambda: self.waited)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(threads.os, "sysconf", lambda name: self.ticks_per_s)

    def second(self, idle_cores: float, waiting_threads: float) -> None:
        self.now += 1.0
        self.idle += int(idle_cores * self.ticks_per_s)
        self.waited += int(waiting_threads * 1e9)


def test_fixed_count_and_bad_values(monkeypatch):
    g = threads.apply(1)
    assert torch.get_num_threads() == 1 and g.threads == 1 and not g.follow
    assert threads.apply(None) is None
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ValueError, match="threads = .* is invalid"):
            threads.apply(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="'0' is not 'auto' or a positive integer"):
        threads.argument("0")
    assert threads.argument("auto") == "auto" and threads.argument("3") == 3


def test_auto_starts_at_the_idle_cores_and_respects_omp_num_threads(monkeypatch):
    FakeMachine(monkeypatch, cores=4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "idle_cores", lambda seconds=0.2: 2.6)
    assert threads.apply("auto").threads == 3 and torch.get_num_threads() == 3
    monkeypatch.setattr(threads, "idle_cores", lambda seconds=0.2: 0.1)
    assert threads.apply("auto").threads == 1  # never fewer than one
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    g = threads.apply("auto")
    assert g.threads == 2 and not g.follow


def test_governor_drops_a_thread_under_contention_and_takes_it_back(monkeypatch):
    machine = FakeMachine(monkeypatch, cores=2)
    monkeypatch.setattr(threads, "idle_cores", lambda seconds=0.2: 2.0)
    g = threads.apply("auto")
    assert g.threads == 2
    machine.now += 0.5
    g.tick()  # too soon to look
    machine.second(idle_cores=0.0, waiting_threads=0.6)  # another process shares a core with one of ours
    g.tick()
    assert g.threads == 1 and torch.get_num_threads() == 1
    machine.second(idle_cores=0.05, waiting_threads=0.0)  # one thread, one core each: stay
    g.tick()
    assert g.threads == 1
    machine.second(idle_cores=0.95, waiting_threads=0.0)  # the other process left
    g.tick()
    assert g.threads == 2 and torch.get_num_threads() == 2
    machine.second(idle_cores=1.5, waiting_threads=0.0)
    g.tick()
    assert g.threads == 2  # never more than the CPU set
