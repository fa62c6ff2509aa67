"""CPU threads for torch: as many as the machine can give this process, kept so while it runs.

    governor = threads.apply("auto")   # or an int (fixed), or None (leave torch's setting alone)
    governor.tick()                    # call often (every engine or training step): it looks every second

torch's intra-op threads meet at a barrier after every parallel op. With more threads than free
cores, one thread shares its core with another process and every op waits for it: a decode step of
~1,000 small ops slows 5-20x. One thread too few costs at most that core's share. So "auto" starts
with the cores of this process's CPU set that are idle now, then follows them: when its threads wait
in the run queue (another process took a core) it drops one; when a core of the set stays idle it
takes one back. Linux only (it reads /proc); elsewhere "auto" is the CPU set's size, fixed.
"""

import argparse
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PERIOD = 1.0  # seconds between looks
WAIT_LIMIT = 0.25  # our threads waiting for a CPU, on average, before one is dropped
IDLE_LIMIT = 0.75  # idle cores of our CPU set, on average, before a thread is added


def cpu_set() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _idle_jiffies(cpus: list[int]) -> int | None:
    """Idle + iowait time of these CPUs since boot, in clock ticks (None without /proc/stat)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    names = {f"cpu{c}" for c in cpus}
    return sum(int(f[4]) + int(f[5]) for f in map(str.split, lines) if f and f[0] in names)


def _run_queue_ns() -> int | None:
    """Nanoseconds this process's threads have spent runnable but waiting for a CPU (None without schedstat)."""
    total = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):  # a thread that just ended
                continue
    except OSError:
        return None
    return total


def idle_cores(seconds: float = 0.2) -> float | None:
    """Cores of our CPU set idle over the next `seconds`, on average (None where it cannot be read)."""
    cpus = cpu_set()
    before = _idle_jiffies(cpus)
    if before is None:
        return None
    time.sleep(seconds)
    return (_idle_jiffies(cpus) - before) / os.sysconf("SC_CLK_TCK") / seconds


class Governor:
    """Keeps torch's thread count at the free cores; `tick()` is cheap between looks."""

    def __init__(self, threads: int, follow: bool):
        self.cpus, self.follow = cpu_set(), follow and _idle_jiffies(cpu_set()) is not None
        self.threads = threads
        torch.set_num_threads(threads)
        self.last = time.monotonic()
        self.idle, self.waited = (_idle_jiffies(self.cpus), _run_queue_ns()) if self.follow else (None, None)

    def tick(self) -> None:
        now = time.monotonic()
        if not self.follow or now - self.last < PERIOD:
            return
        idle, waited = _idle_jiffies(self.cpus), _run_queue_ns()
        seconds = now - self.last
        free = (idle - self.idle) / os.sysconf("SC_CLK_TCK") / seconds
        waiting = (waited - self.waited) / 1e9 / seconds if waited is not None and self.waited is not None else 0.0
        self.last, self.idle, self.waited = now, idle, waited
        if waiting > WAIT_LIMIT and self.threads > 1:
            self._set(self.threads - 1, f"threads waited for a CPU {waiting:.2f} of the time")
        elif free > IDLE_LIMIT and self.threads < len(self.cpus):
            self._set(self.threads + 1, f"{free:.1f} cores idle")

    def _set(self, threads: int, why: str) -> None:
        log.info("CPU threads %d -> %d (%s)", self.threads, threads, why)
        self.threads = threads
        torch.set_num_threads(threads)


def apply(threads: int | str | None) -> Governor | None:
    """A fixed count, "auto" (start at the idle cores, then follow them), or None (torch's own setting).

    OMP_NUM_THREADS, when set, is taken as a fixed count for "auto"."""
    if threads is None:
        return None
    if threads != "auto":
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads = {threads!r} is invalid: must be 'auto' or an integer >= 1")
        return Governor(threads, follow=False)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return Governor(int(os.environ["OMP_NUM_THREADS"]), follow=False)
    return Governor(free_now(), follow=True)


def free_now() -> int:
    """The cores of this process's CPU set that are idle now, at least 1 (all of them where it cannot tell)."""
    cores, idle = len(cpu_set()), idle_cores()
    threads = cores if idle is None else max(1, min(cores, round(idle)))
    log.debug("CPU threads: %d (%s of this process's %d cores idle)", threads, "?" if idle is None else f"{idle:.1f}", cores)
    return threads


def argument(value: str) -> int | str:
    """The --threads flag: "auto" or a positive integer."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'auto' or a positive integer")
    return int(value)
