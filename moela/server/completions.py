"""POST /v1/completions: prompts as text or token ids (one or a list), `n`, `echo`, integer `logprobs`
(with `echo`, for the prompt's tokens too: what lm-evaluation-harness' loglikelihood reads), streaming.

    body = {"model": "m", "prompt": [[0, 17, 42]], "max_tokens": 1, "echo": True, "logprobs": 1}
    -> choices[0].logprobs.token_logprobs = [None, lp(17 | 0), lp(42 | 0 17), lp(generated)]

Choice `index` is prompt_index * n + sample_index, as in OpenAI's API.
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
from moela.server.protocol import ApiError, CompletionRequest, resolve_max_tokens, sampling_params
from moela.server.worker import Job
from moela.tokenizer import Tokenizer


async def create_completion(req: CompletionRequest, request: Request, serving: Serving) -> Response:
    serving.check_model(req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) or _is_ids(req.prompt) else req.prompt
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ApiError(400, "prompt is empty", param="prompt")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": serving.model_name}

    async def submit(job: Job) -> list[str]:
        ids, texts = await run_in_threadpool(_tokenize, serving, prompts)
        max_len, cache = serving.context_limits()
        params = [sampling_params(req, resolve_max_tokens(len(p), req.max_tokens, max_len, cache, "prompt"), req.logprobs,
                                  req.logprobs if req.echo else None) for p in ids]
        await job.submit(ids, params)
        return texts

    def events(job: Job, texts: list[str]) -> AsyncIterator[str]:
        return event_stream(job, req, head, _chunker(req, serving.tokenizer, texts))

    def body(finals: dict[int, RequestOutput], texts: list[str]) -> dict:
        tok = serving.tokenizer
        choices = [_choice(req, tok, i, texts[i], finals[i], o, (o.text, o.token_ids, all_logprobs(o)), req.echo)
                   for i in sorted(finals) for o in finals[i].outputs]
        return {**head, "choices": choices, "usage": usage_of(finals)}

    return await respond(serving, request, req, len(prompts), submit, events, body)


def _is_ids(prompt: list) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def _tokenize(serving: Serving, prompts: list[str | list[int]]) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt (text gets BOS, as transformers encodes it) and its text, for echo."""
    tok, vocab = serving.tokenizer, serving.worker.engine.model_cfg.vocab_size
    ids, texts = [], []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(tok.encode(prompt))
            texts.append(prompt)
            continue
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        ids.append(list(prompt))
        texts.append(tok.decode(prompt, skip_special_tokens=False))
    return ids, texts


def _choice(req: CompletionRequest, tok: Tokenizer, index: int, prompt_text: str, out: RequestOutput, o: CompletionOutput,
            piece: tuple[str, list[int], list[dict]], echo: bool, offset: int = 0) -> dict[str, Any]:
    """One choice, or one streamed chunk of it: `piece` is the (text, token ids, logprob entries) it adds."""
    text, token_ids, entries = piece
    logprobs = None
    if req.logprobs is not None:
        if echo:
            token_ids, entries = out.prompt_token_ids + token_ids, (out.prompt_logprobs or [])[: len(out.prompt_token_ids)] + entries
        logprobs = _logprobs(tok, token_ids, entries, offset)
    return {"index": index * req.n + o.index, "text": (prompt_text if echo else "") + text, "logprobs": logprobs,
            "finish_reason": o.finish_reason}


def _logprobs(tok: Tokenizer, token_ids: list[int], entries: list[dict | None], offset: int) -> dict[str, list]:
    """OpenAI's completion logprobs: the token texts, their logprobs, the top ones, and text offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = token_text(tok, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(None if entry is None else logprob(entry[token_id]))
        top.append(None if entry is None else {token_text(tok, t): logprob(v) for t, v in entry.items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chunker(req: CompletionRequest, tok: Tokenizer, texts: list[str]):
    """The streamed choices of each output: echo (the prompt) in the first chunk of each choice only."""
    started, offsets = set(), {}

    def chunks(i: int, out: RequestOutput) -> Iterator[dict]:
        for o in out.outputs:
            key = (i, o.index)
            if not (o.delta_text or o.delta_token_ids or o.finish_reason):
                continue
            piece = (o.delta_text, o.delta_token_ids, new_logprobs(o))
            choice = _choice(req, tok, i, texts[i], out, o, piece, req.echo and key not in started, offsets.get(key, 0))
            started.add(key)
            offsets[key] = offsets.get(key, 0) + len(choice["text"])
            yield choice

    return chunks
