"""What a request returns (vLLM's RequestOutput shape) and the per-token bookkeeping behind it.

`postprocess` appends a sampled token, detokenizes it, and decides whether the sequence stops (a stop
or EOS token, a stop string, max_tokens, the context length). `make_output` snapshots a request,
moving each sample's streaming cursor: text that could still turn into a stop string is held back.
"""

import time
from dataclasses import dataclass

from moela.engine.sequence import Sequence


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    logprobs: list[dict[int, float]] | None  # per token: {chosen id: logprob, top ids: logprob...}
    cumulative_logprob: float | None
    delta_text: str  # new since the previous RequestOutput of this request
    delta_token_ids: list[int]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_time(self) -> float | None:
        if self.first_token_time is None or self.finish_time is None:
            return None
        return self.finish_time - self.first_token_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    prompt_logprobs: list[dict[int, float] | None] | None
    metrics: RequestMetrics


def postprocess(seq: Sequence, token: int, eos_ids: set[int], max_model_len: int, now: float, done: bool = False) -> None:
    """`done`: the sequence's grammar is complete, so it stops after this token (which it keeps)."""
    seq.token_ids.append(token)
    if seq.first_token_time is None:
        seq.first_token_time = now
    p, reason, cut = seq.params, None, False
    if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
        reason = "stop"
    elif seq.detok is not None:
        before = len(seq.text)
        seq.text += seq.detok.step(token)
        if p.stop and seq.num_output >= p.min_tokens:
            hits = [i for s in p.stop if (i := seq.text.find(s, max(0, before - len(s) + 1))) >= 0]
            if hits:
                seq.text, reason, cut = seq.text[: min(hits)], "stop", True
    max_tokens = p.max_tokens or max_model_len
    if reason is None and done:
        reason = "stop"
    if reason is None and (seq.num_output >= max_tokens or len(seq.token_ids) >= max_model_len):
        reason = "length"
    if reason:
        if not cut and seq.detok is not None:
            seq.text += seq.detok.flush()
        seq.finish_reason, seq.finish_time = reason, now


def make_output(req) -> RequestOutput:
    outs = [_completion(seq) for seq in req.seqs]
    first = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
    done = [s.finish_time for s in req.seqs if s.finish_time is not None]
    finished = all(s.finish_reason is not None for s in req.seqs)
    metrics = RequestMetrics(req.seqs[0].arrival, min(first) if first else None,
                             max(done) if finished and done else (time.perf_counter() if finished else None))
    head = req.seqs[0]
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, head.num_cached_prompt,
                         list(head.prompt_logprobs) if head.params.prompt_logprobs is not None else None, metrics)


def _completion(seq: Sequence) -> CompletionOutput:
    stops = seq.params.stop
    hold = 0 if seq.finish_reason is not None or not stops else max(len(s) for s in stops) - 1
    upto = max(seq.emitted_text, len(seq.text) - hold)
    delta_text, seq.emitted_text = seq.text[seq.emitted_text : upto], upto
    delta_ids, seq.emitted_tokens = seq.output_ids[seq.emitted_tokens :], seq.num_output
    logprobs = list(seq.logprobs) if seq.params.logprobs is not None else None  # a snapshot: the engine keeps appending
    cumulative = sum(next(iter(d.values())) for d in logprobs) if logprobs is not None else None
    return CompletionOutput(seq.index, seq.text[:upto], seq.output_ids, seq.finish_reason, logprobs, cumulative,
                            delta_text, delta_ids)
