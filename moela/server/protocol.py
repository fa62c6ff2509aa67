"""The OpenAI request bodies the server accepts (pydantic, strict types), its error type, and their
mapping onto SamplingParams.

    req = ChatCompletionRequest.model_validate(body)     # wrong types -> ValidationError naming the field
    params = sampling_params(req, max_tokens=32, logprobs=None, prompt_logprobs=None)  # bad ranges -> ApiError 400

Field ranges follow the OpenAI API (plus vLLM's extra sampling knobs: top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens). Every error
leaves the server as `{"error": {"message", "type", "param", "code"}}`.
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from moela.engine.sampler import MAX_LOGPROBS, SamplingParams

MAX_N = 16  # samples per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOPS = 16

Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TopN = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: the rest of the context
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=2, allow_inf_nan=False)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOPS)] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[int] | \
        Annotated[list[list[int]], Field(max_length=MAX_PROMPTS)]
    echo: bool = False
    logprobs: TopN | None = None  # top-N per token; with echo, for the prompt's tokens too


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: TopN | None = None
    chat_template: str | None = None  # refused: only the model's own template renders
    chat_template_kwargs: dict[str, Any] | None = None  # refused likewise
    tools: list[Any] | None = None  # refused: no tool calling
    response_format: dict[str, Any] | None = None  # only {"type": "text"}


def sampling_params(req: SamplingRequest, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    check_logit_bias(req.logit_bias)
    try:
        return SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            max_tokens=max_tokens, min_tokens=req.min_tokens, stop=[] if req.stop is None else req.stop,
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos, seed=req.seed, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens)
    except ValueError as e:  # SamplingParams says "<name> = <value> is invalid: ..."
        raise ApiError(400, str(e), param=str(e).split(" = ")[0]) from None


def check_logit_bias(bias: dict[str, float] | None) -> None:
    """Keys must be token ids; a non-zero bias is refused rather than silently ignored (the sampler has none)."""
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise ApiError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias")
        if value != 0:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")


def resolve_max_tokens(num_prompt: int, max_tokens: int | None, max_model_len: int, cache_tokens: int, param: str,
                       tokens_param: str = "max_tokens") -> int:
    """max_tokens within the context, or the rest of it (and of the KV cache) when unset."""
    if num_prompt >= max_model_len:
        raise ApiError(400, f"the prompt ({num_prompt} tokens) fills the model's context ({max_model_len} tokens): "
                            "no room for a completion", param=param)
    if max_tokens is None:
        room = min(max_model_len, cache_tokens) - num_prompt
        if room < 1:
            raise ApiError(400, f"the prompt ({num_prompt} tokens) fills the KV cache ({cache_tokens} tokens)",
                           param=param)
        return room
    if num_prompt + max_tokens > max_model_len:
        raise ApiError(400, f"prompt ({num_prompt} tokens) + {tokens_param} ({max_tokens}) = {num_prompt + max_tokens} "
                            f"exceeds the model's context of {max_model_len} tokens", param=tokens_param)
    return max_tokens
