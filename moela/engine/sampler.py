"""SamplingParams (vLLM's fields, validated once) and the batched sampler, on the logits' device.

    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, stop=["\\n\\n"], seed=1)
    logits = apply_penalties(logits, [params_a, params_b], histories)
    tokens = sample(logits, [params_a, params_b], [gen_a, gen_b])       # [B] on logits.device

Each request draws its randomness from its own generator (seeded from `seed`, on the engine's
device), so a seeded request gives the same tokens whatever else shares its batch.
"""

import math
from dataclasses import dataclass, field

import torch

from moela.engine.guided import GuidedDecodingParams, check_logit_bias

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-N logprobs per generated token
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token (needs the whole prompt computed)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    guided_decoding: GuidedDecodingParams | None = None  # a grammar the output must follow (engine/guided.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop or []), list(self.stop_token_ids or [])
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                raise ValueError(f"{name} = {v!r} is invalid: must be in {'(' if lo_open else '['}{lo}, {hi}]")

        def integer(name: str, lo: int, hi: int | None = None, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                raise ValueError(f"{name} = {v!r} is invalid: must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))

        number("temperature", 0, 2)
        number("top_p", 0, 1, lo_open=True)
        number("min_p", 0, 1)
        for name in ("presence_penalty", "frequency_penalty"):
            number(name, -2, 2)
        number("repetition_penalty", 0, 2, lo_open=True)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k = {self.top_k!r} is invalid: must be -1 (no limit) or an integer >= 1")
        integer("n", 1, 128)
        integer("max_tokens", 1, optional=True)
        integer("min_tokens", 0, self.max_tokens)
        integer("logprobs", 0, MAX_LOGPROBS, optional=True)
        integer("prompt_logprobs", 0, MAX_LOGPROBS, optional=True)
        integer("seed", -(2**63), 2**63 - 1, optional=True)
        if len(self.stop) > 16 or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop = {self.stop!r} is invalid: must be at most 16 non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids = {self.stop_token_ids!r} is invalid: must be non-negative integers")
        check_logit_bias(self.logit_bias)
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise ValueError(f"guided_decoding = {self.guided_decoding!r} is invalid: must be a GuidedDecodingParams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def generator(self, index: int = 0, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The generator of the index-th sample on device; None (the global RNG) when no seed is set."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed((self.seed + index) % 2**63)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Repetition penalty over prompt + output (HF's rule); presence/frequency over the output (OpenAI's)."""
    for row, (p, (prompt, output)) in enumerate(zip(params, histories)):
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output:
            ids = torch.tensor(output, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[1])[: logits.shape[1]].float()
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [B, V] float32 (penalties applied) -> token ids [B]."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    on_device = lambda values: torch.tensor(values, device=logits.device)  # noqa: E731
    x = logits[rows] / on_device([params[i].temperature for i in rows])[:, None]
    top_k = on_device([params[i].top_k if params[i].top_k > 0 else x.shape[1] for i in rows])
    top_p = on_device([float(params[i].top_p) for i in rows])
    min_p = on_device([float(params[i].min_p) for i in rows])
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(x.shape[1], device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    probs = sorted_x.softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keep the smallest prefix reaching top_p
    drop |= probs < min_p[:, None] * probs[:, :1]
    probs = probs.masked_fill(drop, 0.0)
    for j, i in enumerate(rows):  # exponential race: argmax(p / E), E ~ Exp(1) from the request's own generator
        noise = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=generators[i])
        tokens[i] = order[j, (probs[j] / noise).argmax()]
    return tokens


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of raw logits [B, V]: (logprob of chosen [B], top-n ids [B, n], top-n logprobs [B, n])."""
    logp = logits.float().log_softmax(dim=-1)
    top = logp.topk(n, dim=-1) if n else (logp[:, :0], logp[:, :0].long())
    return logp.gather(1, chosen[:, None])[:, 0], top[1], top[0]
