"""POST /v1/completions: prompts as text or token ids (one or a list), `n`, `echo`, integer `logprobs`
(with `echo`, for the prompt's tokens too: what lm-evaluation-harness' loglikelihood reads), streaming,
`logit_bias`, and output constrained by `response_format` or vLLM's guided_* fields.

    body = {"model": "m", "prompt": [[0, 17, 42]], "max_tokens": 1, "echo": True, "logprobs": 1}
    -> choices[0].logprobs.token_logprobs = [None, lp(17 | 0), lp(42 | 0 17), lp(generated)]
    body = {"model": "m", "prompt": [[0, 17, 42]], "max_tokens": 0, "echo": True, "logprobs": 1}
    -> the prompt's logprobs only (scoring, as OpenAI's legacy API does): no completion token

Choice `index` is prompt_index * n + sample_index, as in OpenAI's API. `text_offset` indexes `text`.
"""

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from moela.engine.outputs import CompletionOutput, RequestOutput
from moela.server.endpoints import (Serving, all_logprobs, event_stream, logprob, new_logprobs, respond, token_text,
                                    usage_of)
from moela.server.protocol import (MAX_PROMPTS, ApiError, CompletionRequest, logit_bias, resolve_max_tokens,
                                   sampling_params)
from moela.server.structured import guided_decoding
from moela.server.worker import Job
from moela.tokenizer import Tokenizer


@dataclass
class Echo:
    """A prompt as echoed: its text, and whether that text holds its special tokens (token-id prompts)."""

    text: str
    specials: bool


async def create_completion(req: CompletionRequest, request: Request, serving: Serving) -> Response:
    serving.check_model(req.model)
    req.check()
    _check_options(req)
    prompts = [req.prompt] if isinstance(req.prompt, str) or _is_ids(req.prompt) else req.prompt
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ApiError(400, "prompt is empty", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt holds {len(prompts)} prompts: at most {MAX_PROMPTS} are allowed in one request",
                       param="prompt")
    score = req.max_tokens == 0  # the prompt's logprobs only: one token is sampled and dropped
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": serving.model_name}

    async def submit(job: Job) -> list[Echo]:
        ids, echoes = await run_in_threadpool(_tokenize, serving, prompts, req.add_special_tokens)
        guided = await run_in_threadpool(guided_decoding, req)
        bias = logit_bias(req.logit_bias, serving.vocab_size)
        max_len, cache = serving.context_limits()
        params = [sampling_params(req, resolve_max_tokens(len(p), 1 if score else req.max_tokens, max_len, cache, "prompt"),
                                  req.logprobs, req.logprobs if req.echo else None, guided_decoding=guided,
                                  logit_bias=bias) for p in ids]
        await job.submit(ids, params)
        return echoes

    def events(job: Job, echoes: list[Echo]) -> AsyncIterator[str]:
        return event_stream(job, req, head, _chunker(req, serving.tokenizer, echoes, score), count_output=not score)

    def body(finals: dict[int, RequestOutput], echoes: list[Echo]) -> dict:
        tok = serving.tokenizer
        choices = [_choice(req, tok, i, echoes[i], finals[i], o, _piece(o, score), req.echo, score)
                   for i in sorted(finals) for o in finals[i].outputs]
        return {**head, "choices": choices, "usage": usage_of(finals, count_output=not score)}

    return await respond(serving, request, req, len(prompts), submit, events, body)


def _check_options(req: CompletionRequest) -> None:
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, f"best_of = {req.best_of} is not supported: this server returns all n = {req.n} samples "
                            "and picks no best ones (best_of must equal n)", param="best_of")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens = 0 is only allowed with echo = true (to score the prompt)", param="max_tokens")


def _piece(o: CompletionOutput, score: bool) -> tuple[str, list[int], list[dict]]:
    return ("", [], []) if score else (o.text, o.token_ids, all_logprobs(o))


def _is_ids(prompt: list) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def _tokenize(serving: Serving, prompts: list[str | list[int]], add_special_tokens: bool) -> tuple[list[list[int]], list[Echo]]:
    """Token ids of each prompt (text gets BOS, as transformers encodes it) and its text, for echo."""
    tok, vocab = serving.tokenizer, serving.vocab_size
    ids, echoes = [], []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(tok.encode(prompt, add_special_tokens=add_special_tokens))
            echoes.append(Echo(prompt, specials=False))
            continue
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        ids.append(list(prompt))
        echoes.append(Echo(tok.decode(prompt, skip_special_tokens=False), specials=True))
    return ids, echoes


def _choice(req: CompletionRequest, tok: Tokenizer, index: int, echo_of: Echo, out: RequestOutput, o: CompletionOutput,
            piece: tuple[str, list[int], list[dict]], echo: bool, score: bool, offset: int = 0) -> dict[str, Any]:
    """One choice, or one streamed chunk of it: `piece` is the (text, token ids, logprob entries) it adds;
    `offset` is where it starts in the whole choice's text."""
    text, token_ids, entries = piece
    prefix = echo_of.text if echo else ""
    logprobs = None
    if req.logprobs is not None:
        starts = _starts(tok, token_ids, not req.skip_special_tokens, offset + len(prefix), len(text))
        if echo:
            prompt_ids = out.prompt_token_ids
            starts = _starts(tok, prompt_ids, echo_of.specials, offset, len(prefix)) + starts
            token_ids, entries = prompt_ids + token_ids, (out.prompt_logprobs or [])[: len(prompt_ids)] + entries
        logprobs = _logprobs(tok, token_ids, entries, starts)
    finish_reason = "length" if score and o.finish_reason is not None else o.finish_reason
    return {"index": index * req.n + o.index, "text": prefix + text, "logprobs": logprobs, "finish_reason": finish_reason}


def _starts(tok: Tokenizer, ids: list[int], specials: bool, base: int, length: int) -> list[int]:
    """Where each token's text starts, from `base`, in a text of `length` characters that decodes `ids`: a
    character cut across tokens starts at its first token; a token whose own text ends the piece it
    completes starts where that text does. A streamed chunk's text may begin with characters whose first
    bytes came in an earlier chunk: the chunk's own tokens then start after them."""
    stream, starts, done = tok.stream(skip_special_tokens=not specials), [], 0
    for token_id in ids:
        piece, own = stream.step(token_id), tok.decode([token_id], skip_special_tokens=not specials)
        starts.append(done + len(piece) - len(own) if own and piece.endswith(own) else done)
        done += len(piece)
    shift = max(0, length - done - len(stream.flush()))
    return [base + min(at + shift, length) for at in starts]


def _logprobs(tok: Tokenizer, token_ids: list[int], entries: list[dict | None], starts: list[int]) -> dict[str, list]:
    """OpenAI's completion logprobs: the token texts, their logprobs, the top ones, and text offsets."""
    tokens, token_logprobs, top = [], [], []
    for token_id, entry in zip(token_ids, entries):
        tokens.append(token_text(tok, token_id))
        token_logprobs.append(None if entry is None else logprob(entry[token_id]))
        top.append(None if entry is None else {token_text(tok, t): logprob(v) for t, v in entry.items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": starts[: len(tokens)]}


def _chunker(req: CompletionRequest, tok: Tokenizer, echoes: list[Echo], score: bool):
    """The streamed choices of each output: echo (the prompt) in the first chunk of each choice only."""
    started, offsets = set(), {}

    def chunks(i: int, out: RequestOutput) -> Iterator[dict]:
        for o in out.outputs:
            key = (i, o.index)
            if not (o.delta_text or o.delta_token_ids or o.finish_reason):
                continue
            piece = ("", [], []) if score else (o.delta_text, o.delta_token_ids, new_logprobs(o))
            choice = _choice(req, tok, i, echoes[i], out, o, piece, req.echo and key not in started, score,
                             offsets.get(key, 0))
            started.add(key)
            offsets[key] = offsets.get(key, 0) + len(choice["text"])
            yield choice

    return chunks
