"""The OpenAI request bodies the server accepts (pydantic, strict types), its error type, and their
mapping onto SamplingParams.

    req = ChatCompletionRequest.model_validate(body)     # wrong types -> ValidationError naming the field
    params = sampling_params(req, max_tokens=32, logprobs=None, prompt_logprobs=None)  # bad ranges -> ApiError 400

Field ranges follow the OpenAI API (plus vLLM's extra sampling knobs: top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens). Every error
leaves the server as `{"error": {"message", "type", "param", "code"}}`.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from moela.engine.guided import MAX_BIAS
from moela.engine.sampler import MAX_LOGPROBS, SamplingParams

MAX_N = 16  # samples per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOPS = 16


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]  # 2.0 is the integer 2, as OpenAI and vLLM take it
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TopN = Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)]
# Fields OpenAI or vLLM define that this server does not honour: refused unless they hold a value that asks for
# nothing (null always does). Other unknown fields are ignored, as vLLM ignores them.
UNHONOURED = {"use_beam_search": (False,), "include_stop_str_in_output": (False,), "allowed_token_ids": (),
              "bad_words": ([],), "truncate_prompt_tokens": (), "prompt_logprobs": (), "length_penalty": (1, 1.0),
              "return_tokens_as_token_ids": (False,), "guided_decoding_backend": ("llguidance",),
              "suffix": ("",), "functions": (), "function_call": (), "audio": (), "prediction": (), "modalities": (["text"],),
              "web_search_options": (), "reasoning_effort": (), "store": (False,), "continue_final_message": (False,),
              "add_generation_prompt": (True,), "documents": (), "echo": (False,)}


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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (the newer spelling of its guided_* fields)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    max_tokens: Annotated[Int, Field(ge=0)] | None = None  # None: the rest of the context; 0 only to score (echo)
    n: Annotated[Int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[Int, Field(ge=-1)] = -1
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=2, allow_inf_nan=False)] = 1.0
    min_tokens: Annotated[Int, Field(ge=0)] = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[Int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: Int | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # Lark, in llguidance's dialect
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, body: Any) -> Any:
        """A lone UTF-16 surrogate ("\\ud800") parses into a str no tokenizer or template can encode."""
        if (where := _lone_surrogate(body)) is not None:
            raise ApiError(400, f"{where} is not valid Unicode: it holds a lone UTF-16 surrogate escape",
                           param=where.split(".")[0])
        return body

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check(self) -> None:
        """What the types alone do not say: refused fields, limits, and options that need one another."""
        for name, value in (self.model_extra or {}).items():
            if name in UNHONOURED and value is not None and value not in UNHONOURED[name]:
                raise ApiError(400, f"{name} = {_shown(value)} is not supported by this server", param=name)
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOPS or len(self.stop_token_ids or []) > MAX_STOPS:
            name = "stop" if len(stops) > MAX_STOPS else "stop_token_ids"
            raise ApiError(400, f"{name} holds {len(stops) if name == 'stop' else len(self.stop_token_ids)} entries: "
                                f"at most {MAX_STOPS} are allowed", param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream = true", param="stream_options")


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The dotted path of the first string (or key) in `value` that holds a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if _lone_surrogate(key) is not None:
                return where or "body"
            if (found := _lone_surrogate(item, path)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _lone_surrogate(item, f"{where}.{i}")) is not None:
                return found
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    echo: bool = False
    logprobs: TopN | None = None  # top-N per token; with echo, for the prompt's tokens too
    best_of: Annotated[Int, Field(ge=1)] | None = None  # only = n: no server-side best-of selection
    add_special_tokens: bool = True  # BOS before a text prompt (when the tokenizer adds one)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: TopN | None = None
    chat_template: str | None = None  # refused: only the model's own template renders
    chat_template_kwargs: dict[str, Any] | None = None  # refused likewise
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: "auto" with tools
    parallel_tool_calls: bool = True


def sampling_params(req: SamplingRequest, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None, **overrides: Any) -> SamplingParams:
    """The request's SamplingParams; `overrides` sets fields the endpoint decides (guided_decoding, logit_bias...)."""
    fields = dict(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                  max_tokens=max_tokens, min_tokens=req.min_tokens, stop=[] if req.stop is None else req.stop,
                  stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos, seed=req.seed,
                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                  repetition_penalty=req.repetition_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                  skip_special_tokens=req.skip_special_tokens)
    try:
        return SamplingParams(**{**fields, **overrides})
    except ValueError as e:  # SamplingParams says "<name> = <value> is invalid: ..."
        raise ApiError(400, str(e), param=str(e).split(" = ")[0]) from None


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids (as strings) of this vocabulary, each biased by a number in [-100, 100]."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise ApiError(400, f"logit_bias key {_shown(key)} is not a token id in [0, {vocab_size})", param="logit_bias")
        if not -MAX_BIAS <= value <= MAX_BIAS:  # NaN fails both
            raise ApiError(400, f"logit_bias[{key}] = {value} is out of range: must be in [-100, 100]",
                           param="logit_bias")
        out[int(key)] = float(value)
    return out or None


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
