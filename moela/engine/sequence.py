"""Sequence: one sample of one request, as the scheduler and block manager see it; Request: the
request whose n samples they are.

A sequence's tokens are the prompt followed by what it generated; `num_computed` of them are in the
cache (the paged kinds in the blocks of `block_table`, the fixed kinds in its `slot`). Text is
detokenized incrementally and cut at stop strings.
"""

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from moela.engine.guided import Guide
from moela.engine.sampler import SamplingParams
from moela.tokenizer import StreamDecoder


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field equality: the scheduler keeps them in lists
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    detok: StreamDecoder | None  # None: the engine has no tokenizer
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at (last) admission
    block_table: list[int] = field(default_factory=list)
    slot: int | None = None  # its buffers in the fixed cache kinds, while it runs (models that have any)
    block_keys: list[bytes] = field(default_factory=list)
    text: str = ""
    emitted_text: int = 0  # characters of `text` already streamed out
    emitted_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    first_sibling: "Sequence | None" = None  # for samples 1..n-1: sample 0, whose prefilled blocks they share
    guide: Guide | None = None  # its grammar's state and logit bias, when it has either

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_prompt_tokens


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)
