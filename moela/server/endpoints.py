"""What /v1/completions and /v1/chat/completions share: the serving context, the one request
skeleton (queue slot, submit, stream or collect), SSE framing, usage, logprob text, disconnect
watching, the streaming response that always cleans up, and the worker's errors as HTTP errors.

    serving = Serving(worker, model_name="my-model", reasoning=False)
    serving.check_model(req.model)                          # ApiError 404 for another name
    return await respond(serving, request, req, n_prompts, submit, events, body)
    # submit(job) tokenizes and submits; events(job, state) streams; body(finals, state) is the JSON answer
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from moela.engine.outputs import CompletionOutput, RequestOutput
from moela.server.protocol import ApiError, SamplingRequest
from moela.server.tools import FORMATS, ToolFormat, detect_format
from moela.server.worker import EngineWorker, Job, NotReady, OverCapacity, QueueFull, Rejected, WorkerError
from moela.tokenizer import Tokenizer

log = logging.getLogger(__name__)
MIN_LOGPROB = -9999.0  # what -inf becomes: JSON has no infinities


@dataclass
class Serving:
    worker: EngineWorker
    model_name: str
    reasoning: bool  # split <think>...</think> into reasoning_content (deepseek_r1)
    tool_call_parser: str | None = None  # the tool-call format; None: the one the model's type and template use

    @property
    def tokenizer(self) -> Tokenizer:
        return self.worker.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.worker.engine.model_cfg.vocab_size

    @cached_property
    def tool_format(self) -> ToolFormat:
        if self.tool_call_parser is not None:
            return FORMATS[self.tool_call_parser]
        return detect_format(self.worker.engine.model_cfg.model_type, self.tokenizer.chat_template)

    @cached_property
    def added_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tokenizer.tok.get_added_tokens_decoder().items()}

    def token(self, text: str) -> str:
        """`text` in a Lark grammar: its added (special) token when the vocabulary has one, else a literal."""
        i = self.added_tokens.get(text)
        return f"<[{i}]>" if i is not None else json.dumps(text)

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


def as_api_error(e: WorkerError) -> ApiError:
    """The worker's refusals and failures as OpenAI error bodies with their HTTP status."""
    if isinstance(e, NotReady):
        return ApiError(503, str(e), type="service_unavailable", code="unavailable", headers={"Retry-After": "5"})
    if isinstance(e, QueueFull):
        return ApiError(503, str(e), type="service_unavailable", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, (OverCapacity, Rejected)):
        return ApiError(400, str(e), param="prompt")
    return ApiError(500, str(e), type="server_error")


def error_event(e: Exception) -> str:
    """The last event of a stream that failed: the OpenAI error body (then [DONE])."""
    if isinstance(e, ApiError):
        return sse(e.body())
    if isinstance(e, WorkerError):
        return sse(as_api_error(e).body())
    log.exception("a streaming request failed")
    return sse(ApiError(500, str(e) or type(e).__name__, type="server_error").body())


async def respond(serving: "Serving", request: Request, req: SamplingRequest, num_prompts: int,
                  submit: Callable[[Job], Awaitable[Any]], events: Callable[[Job, Any], AsyncIterator[str]],
                  body: Callable[[dict[int, RequestOutput], Any], dict]) -> Response:
    """Reserve the queue slots (before any tokenizing), submit, then stream `events` or answer `body`.

    `submit(job)` returns a state (prompt texts, say) that `events` and `body` receive; the job is
    closed however the request ends, which aborts what is unfinished."""
    job = serving.worker.open_job(num_prompts)
    try:
        state = await submit(job)
    except BaseException:
        job.close()
        raise
    if req.stream:
        return EventStream(events(job, state), cleanup=job.close)
    try:
        finals = await collect(job, request)
    finally:
        job.close()
    if finals is None:
        return Response(status_code=499)  # the client is gone
    return JSONResponse(body(finals, state))


async def event_stream(job: Job, req: SamplingRequest, head: dict, choices: Callable[[int, RequestOutput], Iterable[dict]],
                       opening: Iterable[dict] = (), count_output: bool = True) -> AsyncIterator[str]:
    """One SSE event per choice chunk of each output (after the `opening` ones), the usage event when asked
    for (`count_output`: False when the generated tokens are not returned), an error event if the request
    fails midway, then [DONE]."""
    finals: dict[int, RequestOutput] = {}
    try:
        for choice in opening:
            yield sse({**head, "choices": [choice]})
        async for i, out in job.outputs():
            for choice in choices(i, out):
                yield sse({**head, "choices": [choice]})
            if out.finished:
                finals[i] = out
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage_of(finals, count_output)})
    except Exception as e:
        yield error_event(e)
    yield DONE


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def usage_of(finals: dict[int, RequestOutput], count_output: bool = True) -> dict[str, Any]:
    return usage(sum(len(out.prompt_token_ids) for out in finals.values()),
                 sum(len(o.token_ids) for out in finals.values() for o in out.outputs) if count_output else 0,
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
