"""Guided decoding and logit bias: what a sequence may generate next, applied to its logits on the
engine's device before sampling.

    params = SamplingParams(guided_decoding=GuidedDecodingParams(json={"type": "object"}), max_tokens=64)
    params = SamplingParams(guided_decoding=GuidedDecodingParams(choice=["yes", "no"]))
    params = SamplingParams(guided_decoding=GuidedDecodingParams(regex=r"\\d{3}-\\d{4}"), logit_bias={42: -100})

A grammar (a JSON schema, `json_object` for any JSON object, a regex, a list of choices, or a Lark
grammar in llguidance's dialect) is compiled by llguidance into one matcher per sequence. Each step,
every guided sequence's matcher writes the tokens it allows as a bitmask on the host (one bit per
vocabulary entry); the masks go to the device in one copy and every other logit becomes -inf there.
The sampled token advances the matcher; a sequence whose grammar is complete finishes ("stop").
`logit_bias` adds its values (OpenAI's semantics: -100..100) to the logits of its token ids.
"""

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

MAX_BIAS = 100.0


@dataclass
class GuidedDecodingParams:
    """Exactly one of the fields (vLLM's names)."""

    json: str | dict | None = None  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, in llguidance's dialect (%json {...} embeds a schema)
    json_object: bool = False  # any JSON object
    whitespace_pattern: str | None = None  # the whitespace JSON may hold (regex); default: none but ", " and ": "

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) != 1:
            raise ValueError(f"guided_decoding = {self!r} is invalid: set exactly one of json, regex, choice, "
                             f"grammar, json_object (got {given or 'none'})")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"guided_decoding.choice = {self.choice!r} is invalid: must be a non-empty list of strings")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"guided_decoding.json = {self.json!r} is invalid: must be a JSON schema (dict or string)")

    def _given(self) -> list[str]:
        return [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None] + \
            (["json_object"] if self.json_object else [])

    def lark(self) -> str:
        """The Lark expression of what may be generated (a grammar's own `start` rule for `grammar`)."""
        if self.grammar is not None:
            return self.grammar
        if self.regex is not None:
            return "/" + llguidance.regex_to_lark(self.regex) + "/"
        if self.choice is not None:
            return " | ".join(json.dumps(c) for c in self.choice)
        return json_lark({"type": "object"} if self.json_object else self.json, self.whitespace_pattern)

    def compiled(self) -> str:
        """The llguidance grammar; ValueError naming the field when it does not compile."""
        field = self._given()[0]
        try:
            grammar = LLMatcher.grammar_from_lark(self.grammar if self.grammar is not None else "start: " + self.lark())
        except ValueError as e:
            raise ValueError(f"guided_decoding.{field} is invalid: {_reason(str(e), field)}") from None
        error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if error:
            raise ValueError(f"guided_decoding.{field} is invalid: {_reason(messages[0], field)}")
        return grammar


def _reason(message: str, field: str) -> str:
    """llguidance's error, without the position in and the echo of the grammar moela wrapped a schema,
    regex or choice in (a user's own grammar keeps both)."""
    if field == "grammar":
        return message.strip()
    message = re.split(r"\n\s*\d+ \| ", message)[0]
    return re.sub(r"^at \d+\(\d+\): ", "", message.strip())


def json_lark(schema: dict | str, whitespace_pattern: str | None = None) -> str:
    """A JSON schema as a Lark expression. Unless the schema sets its own "x-guidance" options, the JSON
    is compact (", " and ": " between items; no free whitespace, which small models repeat endlessly)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if isinstance(schema, dict) and "x-guidance" not in schema:
        spacing = {"whitespace_pattern": whitespace_pattern} if whitespace_pattern is not None else \
            {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        schema = {**schema, "x-guidance": spacing}
    return "%json " + json.dumps(schema)


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int | None = None) -> None:
    for token, value in (bias or {}).items():
        if not isinstance(token, int) or isinstance(token, bool) or token < 0 or (vocab_size and token >= vocab_size):
            raise ValueError(f"logit_bias key {token!r} is invalid: must be a token id in [0, {vocab_size or 'vocab'})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or abs(value) > MAX_BIAS:
            raise ValueError(f"logit_bias[{token}] = {value!r} is invalid: must be in [-100, 100]")


@dataclass(eq=False)
class Guide:
    """One sequence's constraints: its grammar's matcher and its logit bias (on the device)."""

    matcher: LLMatcher | None
    bias: tuple[torch.Tensor, torch.Tensor] | None  # (token ids [K], values [K])


class Guides:
    """The engine's guided decoding: matchers for new sequences, the per-step masks, the accepted tokens."""

    def __init__(self, tokenizer_json: str | None, vocab_size: int, eos_ids: set[int], device: torch.device):
        self.tokenizer_json, self.vocab_size, self.eos_ids, self.device = tokenizer_json, vocab_size, eos_ids, device
        self._lltok: LLTokenizer | None = None
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask
        self.shifts = torch.arange(32, dtype=torch.int32, device=device)

    @property
    def lltok(self) -> LLTokenizer:
        if self._lltok is None:  # built on first use (tens of ms for a 100k vocabulary)
            self._lltok = LLTokenizer(self.tokenizer_json, n_vocab=self.vocab_size, eos_token=sorted(self.eos_ids))
        return self._lltok

    def start(self, params: Any, n: int) -> list[Guide | None]:
        """The guides of a request's n sequences; ValueError for a grammar or bias this engine cannot use."""
        guided, bias = params.guided_decoding, params.logit_bias
        if guided is None and not bias:
            return [None] * n
        check_logit_bias(bias, self.vocab_size)
        matcher = None
        if guided is not None:
            if self.tokenizer_json is None:
                raise ValueError("guided_decoding needs the tokenizer: this engine was started with skip_tokenizer_init")
            matcher = LLMatcher(self.lltok, guided.compiled(), log_level=0)
            if matcher.is_error():
                raise ValueError(f"guided_decoding is invalid: {matcher.get_error()}")
        on_device = None
        if bias:
            on_device = (torch.tensor(list(bias), dtype=torch.long, device=self.device),
                         torch.tensor(list(bias.values()), dtype=torch.float32, device=self.device))
        return [Guide(matcher.deep_copy() if matcher else None, on_device) for _ in range(n)]

    def apply(self, logits: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
        """logits [B, V] with each row's bias added and every token its grammar forbids at -inf."""
        for row, guide in enumerate(guides):
            if guide is not None and guide.bias is not None:
                logits[row].index_add_(0, *guide.bias)
        rows = [row for row, guide in enumerate(guides) if guide is not None and guide.matcher is not None]
        if not rows:
            return logits
        words = np.empty((len(rows), self.words), dtype=np.int32)
        for i, row in enumerate(rows):
            guides[row].matcher.unsafe_compute_mask_ptr(words[i].ctypes.data, words.shape[1] * 4)
        masks = torch.from_numpy(words).to(self.device, non_blocking=True)  # [G, W]
        allowed = (masks[:, :, None] >> self.shifts) & 1  # [G, W, 32]: bit j of word w is token 32 w + j
        allowed = allowed.reshape(len(rows), -1)[:, : logits.shape[1]].bool()  # [G, V]
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return logits

    @staticmethod
    def accept(guide: Guide | None, token: int) -> bool:
        """Advance the grammar by the sampled token; True once it is complete (the sequence should stop)."""
        if guide is None or guide.matcher is None:
            return False
        guide.matcher.consume_token(token)
        return guide.matcher.is_stopped()
