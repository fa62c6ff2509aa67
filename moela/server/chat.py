"""POST /v1/chat/completions: messages through the model's own chat template, `max_tokens` or
`max_completion_tokens`, boolean `logprobs` with `top_logprobs`, streaming (the role in the first
delta, usage only with `stream_options.include_usage`), and with `--reasoning-parser deepseek_r1`
the `<think>` part in `reasoning_content`, split identically streamed or not.

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 64}
"""

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from moela.engine.outputs import CompletionOutput, RequestOutput
from moela.server.endpoints import (Serving, all_logprobs, event_stream, logprob, new_logprobs, respond, token_text,
                                    usage_of)
from moela.server.protocol import ApiError, ChatCompletionRequest, ChatMessage, resolve_max_tokens, sampling_params
from moela.server.reasoning import ReasoningSplitter
from moela.server.worker import Job
from moela.tokenizer import Tokenizer


async def create_chat_completion(req: ChatCompletionRequest, request: Request, serving: Serving) -> Response:
    serving.check_model(req.model)
    _check_options(req)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": serving.model_name}

    async def submit(job: Job) -> None:
        ids = await run_in_threadpool(render, serving.tokenizer, req.messages)
        max_len, cache = serving.context_limits()
        name = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = resolve_max_tokens(len(ids), getattr(req, name), max_len, cache, "messages", name)
        top = (req.top_logprobs or 0) if req.logprobs else None
        await job.submit([ids], [sampling_params(req, max_tokens, top, None)])

    splitters = [ReasoningSplitter() for _ in range(req.n)]

    def chunks(_, out: RequestOutput) -> Iterator[dict]:
        for o in out.outputs:
            if (chunk := _chunk(req, serving, o, splitters[o.index])) is not None:
                yield chunk

    def events(job: Job, _) -> AsyncIterator[str]:
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(req.n)]
        return event_stream(job, req, {**head, "object": "chat.completion.chunk"}, chunks, opening)

    def body(finals: dict[int, RequestOutput], _) -> dict:
        choices = [_choice(req, serving, o) for o in finals[0].outputs]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage_of(finals)}

    return await respond(serving, request, req, 1, submit, events, body)


def _check_options(req: ChatCompletionRequest) -> None:
    for name in ("chat_template", "chat_template_kwargs", "tools"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not accepted by this server: the model's own chat template renders "
                                "messages, without tools", param=name)
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise ApiError(400, "response_format other than {'type': 'text'} is not supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs = true", param="top_logprobs")


def render(tok: Tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Token ids of the conversation through the model's template (which holds BOS itself)."""
    turns = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            content = "".join(part.text for part in content)
        turn = {"role": m.role, "content": content or ""}
        turn.update({k: v for k, v in (("name", m.name), ("reasoning_content", m.reasoning_content)) if v is not None})
        turns.append(turn)
    try:
        text = tok.apply_chat_template(turns, add_generation_prompt=True)
    except Exception as e:  # the template's raise_exception, or messages it cannot render
        raise ApiError(400, str(e), param="messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise ApiError(400, "the messages render to an empty prompt", param="messages")
    return ids


def _choice(req: ChatCompletionRequest, serving: Serving, o: CompletionOutput) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": o.text}
    if serving.reasoning:
        reasoning, content = ReasoningSplitter().feed(o.text, final=True)
        message.update(content=content or None, reasoning_content=reasoning or None)
    logprobs = None
    if req.logprobs:
        logprobs = {"content": _logprobs(serving.tokenizer, o.token_ids, all_logprobs(o), req.top_logprobs or 0)}
    return {"index": o.index, "message": message, "logprobs": logprobs, "finish_reason": o.finish_reason}


def _logprobs(tok: Tokenizer, token_ids: list[int], entries: list[dict], top: int) -> list[dict[str, Any]]:
    def item(token_id: int, value: float) -> dict[str, Any]:
        text = token_text(tok, token_id)
        return {"token": text, "logprob": logprob(value), "bytes": list(text.encode("utf-8"))}

    def best(entry: dict[int, float]) -> list[dict[str, Any]]:  # the entry holds the chosen token and the top ones
        return [item(k, v) for k, v in sorted(entry.items(), key=lambda kv: -kv[1])[:top]]

    return [{**item(t, entry[t]), "top_logprobs": best(entry)} for t, entry in zip(token_ids, entries)]


def _chunk(req: ChatCompletionRequest, serving: Serving, o: CompletionOutput, splitter: ReasoningSplitter) -> dict | None:
    delta: dict[str, str] = {}
    if serving.reasoning:
        reasoning, content = splitter.feed(o.delta_text, final=o.finish_reason is not None)
        delta.update({k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v})
    elif o.delta_text:
        delta["content"] = o.delta_text
    entries = new_logprobs(o)
    if not (delta or entries or o.finish_reason):
        return None
    logprobs = {"content": _logprobs(serving.tokenizer, o.delta_token_ids, entries, req.top_logprobs or 0)} \
        if req.logprobs else None
    return {"index": o.index, "delta": delta, "logprobs": logprobs, "finish_reason": o.finish_reason}
