"""EngineWorker: the one thread that owns the LLMEngine (which is not thread-safe), bridged to asyncio.

    worker = EngineWorker(lambda: LLMEngine(cfg), capacity=64 + 256)
    worker.start(asyncio.get_running_loop())  # builds the engine, runs a warm-up forward, then state "ready"
    job = worker.open_job(num_prompts)        # reserves queue slots first: NotReady / QueueFull / OverCapacity
    try:
        await job.submit(prompt_ids, params)  # the engine's refusal is raised here as Rejected
        async for index, out in job.outputs(): ...   # RequestOutputs of each prompt, the last one finished
    finally:
        job.close()                           # aborts what is unfinished (a client that left) and frees the slots

Commands (add, abort, stop) reach the engine thread through a queue and are applied between steps;
each step's outputs come back with `loop.call_soon_threadsafe`. Only the event loop touches jobs,
slots and latency metrics; only the engine thread touches the engine, publishing its stats as
`snapshot` for /metrics. If the engine raises, every request in flight fails, the state becomes
"dead" (so /health says 503) and `on_dead` asks the server to exit. The worker raises its own
errors (WorkerError and subclasses); the app maps them to HTTP.
"""

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from moela.engine.llm import LLMEngine
from moela.engine.outputs import RequestOutput
from moela.engine.sampler import SamplingParams
from moela.server.metrics import ServerMetrics

log = logging.getLogger(__name__)
EXPERT_LOAD_PERIOD = 1.0  # seconds between reads of the expert counters while busy


class WorkerError(Exception):
    """What the worker refuses or fails with; the app turns each kind into its HTTP status."""


class EngineUnavailable(WorkerError):
    """The engine failed or is shutting down: requests in flight end with this error."""


class NotReady(WorkerError):
    """The server is loading, draining or stopped: no new requests."""


class QueueFull(WorkerError):
    """Every request slot is taken; the client may retry shortly."""


class OverCapacity(WorkerError):
    """One HTTP request asks for more engine requests than the server ever holds at once."""


class Rejected(WorkerError):
    """The engine refused a request at admission (the client's fault: too long, bad ids)."""


@dataclass(eq=False)
class Track:
    """One engine request, as the event loop follows it."""

    job: "Job"
    index: int  # which prompt of the job
    ack: asyncio.Future
    arrival: float
    last_token: float | None = None


class Job:
    """One HTTP request's engine requests (one per prompt), their outputs on one queue tagged with the prompt index."""

    def __init__(self, worker: "EngineWorker", slots: int):
        self.worker, self.slots = worker, slots
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished: set[str] = set()
        self.size = 0
        self.closed = False

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        acks = [self.worker.add(self, i, ids, p) for i, (ids, p) in enumerate(zip(prompts, params))]
        self.size = len(acks)
        await asyncio.gather(*acks)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        pending = self.size
        while pending:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            pending -= item[1].finished
            yield item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for rid in self.unfinished:
            self.worker.abort(rid)
        self.unfinished.clear()
        self.worker.in_flight -= self.slots


class EngineWorker:
    def __init__(self, build: Callable[[], LLMEngine], capacity: int):
        self.build, self.capacity = build, capacity
        self.state = "loading"  # -> "ready" -> "draining" | "dead" | "stopped"
        self.engine: LLMEngine | None = None
        self.snapshot: dict = {}
        self.metrics = ServerMetrics(lambda: self.snapshot)
        self.on_dead: Callable[[], None] = lambda: None
        self.on_ready: Callable[[], None] = lambda: None  # called from the engine thread once warmed up
        self.in_flight = 0  # reserved request slots
        self.tracks: dict[str, Track] = {}
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._expert_load: dict[int, list[int]] = {}
        self._expert_load_time = 0.0

    # ---- event-loop side ----
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="moela-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self.state not in ("dead", "stopped"):
            self.state = "stopped"
        self.commands.put(("stop",))
        self._fail_all(EngineUnavailable("the server is shutting down"))
        if self.thread is not None:
            self.thread.join(timeout)

    def open_job(self, num_requests: int) -> Job:
        if self.state != "ready":
            raise NotReady(f"the server is {self.state}")
        if num_requests > self.capacity:
            raise OverCapacity(f"{num_requests} prompts exceed the server's capacity of {self.capacity} requests")
        if self.in_flight + num_requests > self.capacity:
            raise QueueFull(f"the request queue is full ({self.in_flight} of {self.capacity} slots in use)")
        self.in_flight += num_requests
        return Job(self, num_requests)

    def add(self, job: Job, index: int, prompt: list[int], params: SamplingParams) -> asyncio.Future:
        rid, ack = uuid.uuid4().hex, self.loop.create_future()
        self.tracks[rid] = Track(job, index, ack, time.perf_counter())
        job.unfinished.add(rid)
        self.commands.put(("add", rid, prompt, params))
        return ack

    def abort(self, rid: str) -> None:
        if self.tracks.pop(rid, None) is not None:
            self.commands.put(("abort", rid))

    def abort_all(self) -> None:
        """Abort every request in the engine; each still gets its last output (finish_reason "abort")."""
        for rid in self.tracks:
            self.commands.put(("abort", rid))

    def _acked(self, rid: str, error: Exception | None) -> None:
        track = self.tracks.get(rid)
        if track is None or track.ack.done():
            return
        if error is None:
            track.ack.set_result(None)
            return
        del self.tracks[rid]
        track.job.unfinished.discard(rid)
        track.ack.set_exception(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            track = self.tracks.get(out.request_id)
            if track is None:  # the warm-up request, or a job that was closed
                continue
            if any(o.delta_token_ids for o in out.outputs):
                if track.last_token is None:
                    self.metrics.ttft.observe(now - track.arrival)
                else:
                    self.metrics.itl.observe(now - track.last_token)
                track.last_token = now
            if out.finished:
                self.metrics.e2e.observe(now - track.arrival)
                log.info("request %s finished: %d prompt + %s generated tokens, %s, %.2fs", out.request_id,
                         len(out.prompt_token_ids), "+".join(str(len(o.token_ids)) for o in out.outputs),
                         "/".join(str(o.finish_reason) for o in out.outputs), now - track.arrival)
                del self.tracks[out.request_id]
                track.job.unfinished.discard(out.request_id)
            track.job.queue.put_nowait((track.index, out))

    def _fail_all(self, error: BaseException) -> None:
        for track in self.tracks.values():
            if not track.ack.done():
                track.ack.set_exception(error)
            track.job.queue.put_nowait(error)
        self.tracks.clear()

    def _died(self, error: BaseException) -> None:
        self._fail_all(EngineUnavailable(f"the engine failed: {error!r}"))
        self.on_dead()

    # ---- engine thread ----
    def _run(self) -> None:
        try:
            self.engine = self.build()
            self._warm_up()
            if self.state == "loading":
                self.state = "ready"
                self.on_ready()
            self._serve()
        except BaseException as e:  # the engine is gone: fail everything, ask the server to exit
            if self.state == "stopped":
                return
            log.exception("engine thread failed")
            self.state = "dead"
            self.loop.call_soon_threadsafe(self._died, e)

    def _warm_up(self) -> None:
        """One real forward pass before /health says 200."""
        self.engine.add_request([0], SamplingParams(max_tokens=1, temperature=0), "warmup")
        for _ in range(8):
            if not self.engine.has_unfinished():
                break
            self.engine.step()
        self._publish()

    def _serve(self) -> None:
        while self._apply_commands(block=not self.engine.has_unfinished()):
            if self.engine.has_unfinished():
                outputs = self.engine.step()
                self.loop.call_soon_threadsafe(self._deliver, outputs)
            self._publish()

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when idle); False once told to stop."""
        try:
            command = self.commands.get() if block else self.commands.get_nowait()
            while True:
                if command[0] == "stop":
                    return False
                if command[0] == "add":
                    self._add(*command[1:])
                else:
                    self.engine.abort(command[1])
                command = self.commands.get_nowait()
        except queue.Empty:
            return True

    def _add(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        error = None
        try:
            self.engine.add_request(prompt, params, rid)
        except ValueError as e:  # the engine's own admission checks: the client's fault
            error = Rejected(str(e))
        except Exception as e:  # this request alone fails
            log.exception("add_request failed")
            error = e
        self.loop.call_soon_threadsafe(self._acked, rid, error)

    def _publish(self) -> None:
        now = time.monotonic()
        if now - self._expert_load_time >= EXPERT_LOAD_PERIOD or not self.engine.has_unfinished():
            self._expert_load, self._expert_load_time = self.engine.expert_load(), now
        self.snapshot = {**self.engine.stats(), "expert_load": self._expert_load}
