"""POST /v1/chat/completions: messages through the model's own chat template, `max_tokens` or
`max_completion_tokens`, boolean `logprobs` with `top_logprobs`, streaming (the role in the first
delta, usage only with `stream_options.include_usage`), with `--reasoning-parser deepseek_r1` the
`<think>` part in `reasoning_content`, and tool calls (`tools`, `tool_choice`, `tool` messages) in the
model's DeepSeek format (moela/server/tools.py), split identically streamed or not.

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 64}
    body = {..., "tools": [{"type": "function", "function": {"name": "f", "parameters": {...}}}], "tool_choice": "required"}

A "required" or named tool choice, tools marked `strict` (under "auto": calls, if any, valid),
`response_format` and vLLM's guided_* fields constrain the output by grammar (moela/engine/guided.py),
so it always parses.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from moela.engine.guided import GuidedDecodingParams
from moela.engine.outputs import CompletionOutput, RequestOutput
from moela.server.endpoints import (Serving, all_logprobs, event_stream, logprob, new_logprobs, respond, token_text,
                                    usage_of)
from moela.server.protocol import (ApiError, ChatCompletionRequest, ChatMessage, NamedToolChoice, logit_bias,
                                   resolve_max_tokens, sampling_params)
from moela.server.reasoning import ReasoningSplitter
from moela.server.structured import after_thinking, guided_decoding
from moela.server.tools import ToolCallStream, ToolFormat, call_grammar, describe
from moela.server.worker import Job
from moela.tokenizer import Tokenizer


async def create_chat_completion(req: ChatCompletionRequest, request: Request, serving: Serving) -> Response:
    serving.check_model(req.model)
    req.check()
    _check_options(req)
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    calling = bool(tools) and req.tool_choice != "none"  # the completion is parsed for calls
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": serving.model_name}

    async def submit(job: Job) -> None:
        ids = await run_in_threadpool(render, serving, req.messages, tools)
        guided = await run_in_threadpool(_guided, serving, req, tools)
        max_len, cache = serving.context_limits()
        name = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = resolve_max_tokens(len(ids), getattr(req, name), max_len, cache, "messages", name)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, max_tokens, top, None, guided_decoding=guided,
                                 logit_bias=logit_bias(req.logit_bias, serving.vocab_size),
                                 skip_special_tokens=req.skip_special_tokens and not calling)  # keep the call markers
        await job.submit([ids], [params])

    fmt = serving.tool_format if calling else None
    states = [_Split(serving.reasoning, fmt, req.parallel_tool_calls) for _ in range(req.n)]

    def chunks(_, out: RequestOutput) -> Iterator[dict]:
        for o in out.outputs:
            if (chunk := _chunk(req, serving, o, states[o.index])) is not None:
                yield chunk

    def events(job: Job, _) -> AsyncIterator[str]:
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(req.n)]
        return event_stream(job, req, {**head, "object": "chat.completion.chunk"}, chunks, opening)

    def body(finals: dict[int, RequestOutput], _) -> dict:
        choices = [_choice(req, serving, o, fmt) for o in finals[0].outputs]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage_of(finals)}

    return await respond(serving, request, req, 1, submit, events, body)


def _check_options(req: ChatCompletionRequest) -> None:
    for name in ("chat_template", "chat_template_kwargs"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not accepted by this server: the model's own chat template renders "
                                "messages", param=name)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs = true", param="top_logprobs")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) < len(names):
        raise ApiError(400, f"tools name one function twice: {sorted(n for n in set(names) if names.count(n) > 1)}",
                       param="tools")
    choice = req.tool_choice
    if choice == "required" and not names:
        raise ApiError(400, "tool_choice 'required' needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ApiError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools "
                            f"({', '.join(names) or 'none given'})", param="tool_choice")


def _guided(serving: Serving, req: ChatCompletionRequest, tools: list[dict]) -> GuidedDecodingParams | None:
    """A forced tool call's grammar, or the response format's, or None; each tool's schema checked first."""
    for i, tool in enumerate(tools):
        schema = tool.get("parameters") or {"type": "object"}
        if schema.get("type", "object") != "object":  # arguments are always an object, in every format
            raise ApiError(400, f"tools.{i}.function.parameters must describe an object (type 'object'), not "
                                f"type {schema['type']!r}", param="tools")
        try:
            GuidedDecodingParams(json=schema).compiled()
        except ValueError as e:
            raise ApiError(400, str(e).replace("guided_decoding.json", f"tools.{i}.function.parameters", 1),
                           param="tools") from None
    guided = guided_decoding(req)
    forced = req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
    strict = req.tool_choice in (None, "auto") and any(t.get("strict") for t in tools)  # calls, if any, valid
    if not (forced or strict):
        return after_thinking(guided, serving.token) if serving.reasoning else guided
    if guided is not None:
        what, param = ("a required or named tool_choice", "tool_choice") if forced else ("a strict tool", "tools")
        raise ApiError(400, f"{what} already constrains the output: drop response_format and guided_* fields",
                       param=param)
    name = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
    grammar = call_grammar(serving.tool_format, tools, name, req.parallel_tool_calls, serving.token, serving.reasoning,
                           optional=strict)
    return GuidedDecodingParams(grammar=grammar)


def render(serving: Serving, messages: list[ChatMessage], tools: list[dict]) -> list[int]:
    """Token ids of the conversation through the model's template (which holds BOS itself). The tools go to
    the template when it renders them, else into the system message."""
    tok, fmt = serving.tokenizer, serving.tool_format if tools else None
    turns = [_turn(m, fmt) for m in messages]
    kwargs = {}
    if tools and "tools" in (tok.chat_template or ""):
        kwargs["tools"] = [{"type": "function", "function": t} for t in tools]
    elif tools:
        system = describe(fmt, tools)
        if turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{system}"}
        else:
            turns.insert(0, {"role": "system", "content": system})
    try:
        text = tok.apply_chat_template(turns, add_generation_prompt=True, **kwargs)
    except Exception as e:  # the template's raise_exception, or messages it cannot render
        raise ApiError(400, str(e), param="messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise ApiError(400, "the messages render to an empty prompt", param="messages")
    return ids


def _turn(m: ChatMessage, fmt: ToolFormat | None) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        if any(part.type != "text" or part.text is None for part in content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        content = "".join(part.text for part in content)
    turn = {"role": m.role, "content": content if content is not None or m.tool_calls else ""}
    turn.update({k: v for k, v in (("name", m.name), ("reasoning_content", m.reasoning_content),
                                   ("tool_call_id", m.tool_call_id)) if v is not None})
    if m.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments, fmt)}} for c in m.tool_calls]
    return turn


def _arguments(text: str, fmt: ToolFormat | None) -> str | dict:
    """As the template wants them: JSON text (V3, V3.1), or an object whose items become DSML parameters."""
    if fmt is None or not fmt.dsml:
        return text
    try:
        args = json.loads(text)
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise ApiError(400, f"tool call arguments must be a JSON object (got {text[:60]!r})", param="messages")
    return args


@dataclass
class _Split:
    """One choice's streaming state: reasoning, then content and tool calls."""

    reasoning: bool
    fmt: ToolFormat | None
    parallel: bool = True  # parallel_tool_calls: False keeps only the first call
    thinking: ReasoningSplitter = field(default_factory=ReasoningSplitter)
    calls: ToolCallStream | None = None

    def __post_init__(self) -> None:
        self.calls = ToolCallStream(self.fmt, self.parallel) if self.fmt is not None else None

    def feed(self, text: str, final: bool) -> dict[str, Any]:
        """The delta of this piece: reasoning_content, content, tool_calls (only those present)."""
        reasoning, content = self.thinking.feed(text, final) if self.reasoning else ("", text)
        entries = []
        if self.calls is not None:
            content, entries = self.calls.feed(content, final)
        return {k: v for k, v in (("reasoning_content", reasoning), ("content", content), ("tool_calls", entries)) if v}

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls is not None and self.calls.called else reason


def _choice(req: ChatCompletionRequest, serving: Serving, o: CompletionOutput, fmt: ToolFormat | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": o.text}
    finish_reason = o.finish_reason
    if serving.reasoning or fmt is not None:
        split = _Split(serving.reasoning, fmt, req.parallel_tool_calls)
        parts = split.feed(o.text, final=True)
        message.update(content=parts.get("content"), reasoning_content=parts.get("reasoning_content"))
        if "tool_calls" in parts:
            message["tool_calls"] = [{k: c[k] for k in ("id", "type", "function")} for c in parts["tool_calls"]]
        finish_reason = split.finish_reason(o.finish_reason)
        if not serving.reasoning:
            del message["reasoning_content"]
    logprobs = None
    if req.logprobs:
        logprobs = {"content": _logprobs(serving.tokenizer, o.token_ids, all_logprobs(o), req.top_logprobs or 0)}
    return {"index": o.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def _logprobs(tok: Tokenizer, token_ids: list[int], entries: list[dict], top: int) -> list[dict[str, Any]]:
    def item(token_id: int, value: float) -> dict[str, Any]:
        text = token_text(tok, token_id)
        return {"token": text, "logprob": logprob(value), "bytes": list(text.encode("utf-8"))}

    def best(entry: dict[int, float]) -> list[dict[str, Any]]:  # the entry holds the chosen token and the top ones
        return [item(k, v) for k, v in sorted(entry.items(), key=lambda kv: -kv[1])[:top]]

    return [{**item(t, entry[t]), "top_logprobs": best(entry)} for t, entry in zip(token_ids, entries)]


def _chunk(req: ChatCompletionRequest, serving: Serving, o: CompletionOutput, split: _Split) -> dict | None:
    final = o.finish_reason is not None
    delta = split.feed(o.delta_text, final) if serving.reasoning or split.fmt is not None else \
        ({"content": o.delta_text} if o.delta_text else {})
    entries = new_logprobs(o)
    if not (delta or entries or final):
        return None
    logprobs = {"content": _logprobs(serving.tokenizer, o.delta_token_ids, entries, req.top_logprobs or 0)} \
        if req.logprobs else None
    return {"index": o.index, "delta": delta, "logprobs": logprobs, "finish_reason": split.finish_reason(o.finish_reason)}
