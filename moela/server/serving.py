"""What /v1/completions and /v1/chat/completions share: the serving context, SSE framing, usage,
logprob text, disconnect watching, and the streaming response that always cleans up.

    serving = Serving(worker, model_name="my-model", reasoning=False)
    serving.check_model(req.model)                          # ApiError 404 for another name
    finals = await collect(job, request)                    # None when the client left first
    return EventStream(events(), cleanup=job.close)         # cleanup runs even if no byte was sent
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from moela.engine.outputs import CompletionOutput, RequestOutput
from moela.server.protocol import ApiError
from moela.server.worker import EngineUnavailable, EngineWorker, Job
from moela.tokenizer import Tokenizer

log = logging.getLogger(__name__)
MIN_LOGPROB = -9999.0  # what -inf becomes: JSON has no infinities


@dataclass
class Serving:
    worker: EngineWorker
    model_name: str
    reasoning: bool  # split <think>...</think> into reasoning_content (deepseek_r1)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.worker.engine.tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist: this server serves {self.model_name!r}", param="model",
                           code="model_not_found")

    def context_limits(self) -> tuple[int, int]:
        """(max_model_len, tokens the whole KV cache holds)."""
        return self.worker.engine.max_model_len, self.worker.engine.max_cached_tokens


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


DONE = "data: [DONE]\n\n"


def error_event(e: Exception) -> str:
    """The last event of a stream that failed: the OpenAI error body (then [DONE])."""
    if isinstance(e, ApiError):
        return sse(e.body())
    if not isinstance(e, EngineUnavailable):
        log.exception("a streaming request failed")
    return sse(ApiError(500, str(e) or type(e).__name__, type="server_error").body())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def usage_of(finals: dict[int, RequestOutput]) -> dict[str, Any]:
    return usage(sum(len(out.prompt_token_ids) for out in finals.values()),
                 sum(len(o.token_ids) for out in finals.values() for o in out.outputs),
                 sum(out.num_cached_tokens for out in finals.values()))


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def logprob(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB


def new_logprobs(o: CompletionOutput) -> list[dict]:
    """The logprob entries of this output's new tokens. `o.logprobs` is the engine's live list, which may
    already hold entries of later steps by the time this runs: it is cut at `o.token_ids`, a snapshot."""
    end = len(o.token_ids)
    return (o.logprobs or [])[end - len(o.delta_token_ids): end] if o.delta_token_ids else []


def all_logprobs(o: CompletionOutput) -> list[dict]:
    return (o.logprobs or [])[: len(o.token_ids)]


async def until_disconnect(request: Request, work: Coroutine) -> bool:
    """Run `work` unless the client disconnects first (then cancel it and return False)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return False
    task.result()  # re-raises a failure of the work itself
    return True


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] == "http.request":
        pass  # the body was read already; more request messages would be empty


async def collect(job: Job, request: Request) -> dict[int, RequestOutput] | None:
    """The finished output of each prompt, or None if the client left before they were done."""
    finals: dict[int, RequestOutput] = {}

    async def gather() -> None:
        async for index, out in job.outputs():
            if out.finished:
                finals[index] = out

    return finals if await until_disconnect(request, gather()) else None


class EventStream(StreamingResponse):
    """Server-sent events whose `cleanup` runs however the response ends, even before its first byte."""

    def __init__(self, events: AsyncIterator[str], cleanup: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cleanup()
