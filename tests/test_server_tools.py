"""Tool calls through the openai client, for each DeepSeek format (`--tool-call-parser`): a required or
named tool_choice gives calls whose arguments validate against the tool's schema even from a tiny
random model, streamed deltas add up to the non-streamed calls, a conversation carrying calls and tool
results renders, and reasoning comes before a call. The V3/V3.1 markers are special tokens here."""

import json

import jsonschema_rs
import pytest
from tokenizers import Tokenizer as HFTokenizer

from moela.server.cli import parse_args
from moela.server.tools import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, FORMATS, SEP
from test_server import REASONING, ThreadServer, tiny_model

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "required": ["city", "unit"], "additionalProperties": False, "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string", "maxLength": 8}}, "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
USER = [{"role": "user", "content": "weather in Paris?"}]
TEMPLATE = ("{{ bos_token }}{% for t in tools or [] %}{{ t['function']['name'] }}\n{% endfor %}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
            "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% elif m['role'] == 'assistant' %}<｜Assistant｜>"
            "{{ m['content'] or '' }}{% for c in m['tool_calls'] or [] %}{{ c['function']['name'] }}"
            "{{ c['function']['arguments'] | tojson }}{% endfor %}{{ eos_token }}{% elif m['role'] == 'tool' %}"
            "<result>{{ m['content'] }}</result>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


def with_tools_template(path, tmp_path_factory, name: str):
    """A copy of a tiny model whose template lists the tools and whose vocabulary has V3's markers as special tokens."""
    out = tmp_path_factory.mktemp(name)
    for file in ("config.json", "model.safetensors"):
        (out / file).write_bytes((path / file).read_bytes())
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP])
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def tools_path(tmp_path_factory):
    return with_tools_template(tiny_model(tmp_path_factory)[0], tmp_path_factory, "tools")


@pytest.fixture(scope="module")
def servers(tools_path):
    """format -> a server of the random tiny model in that format, started on first use."""
    path, started = tools_path, {}

    def get(fmt: str) -> ThreadServer:
        if fmt not in started:
            started[fmt] = ThreadServer(path, tool_call_parser=fmt, max_model_len=512).start()
        return started[fmt]

    yield get
    for srv in started.values():
        srv.stop()


def assemble(chunks) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) of a streamed chat completion, as a client adds it up."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id is not None:
                assert call.index not in calls and call.type == "function"
                calls[call.index] = [call.function.name, ""]
            calls[call.index][1] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def check_calls(message, name: str | None = None) -> list[tuple[str, str]]:
    assert message.tool_calls and message.content is None
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and (name is None or call.function.name == name)
        assert jsonschema_rs.is_valid(SCHEMAS[call.function.name], json.loads(call.function.arguments))
    return [(c.function.name, c.function.arguments) for c in message.tool_calls]


@pytest.mark.parametrize("fmt", FORMATS)
def test_named_call_is_valid_and_streams_identically(servers, fmt):
    client = servers(fmt).client()
    body = dict(model="tiny", messages=USER, tools=[WEATHER, CLOCK], max_tokens=400, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls"
    calls = check_calls(whole.message, "get_weather")
    assert assemble(client.chat.completions.create(**body, stream=True)) == ("", calls, "tool_calls")


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_are_valid_and_stream_identically(servers, parallel):
    client = servers("deepseek_v31").client()
    body = dict(model="tiny", messages=USER, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=200,
                parallel_tool_calls=parallel, temperature=1.0, seed=1)
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls"
    calls = check_calls(whole.message)
    assert parallel or len(calls) == 1
    assert assemble(client.chat.completions.create(**body, stream=True)) == ("", calls, "tool_calls")


@pytest.mark.parametrize("fmt", ["deepseek_v3", "deepseek_v31"])
def test_strict_tools_under_auto_give_valid_calls_or_none(servers, tools_path, fmt):
    """Biased towards opening a call block at once, the random model still writes calls that validate."""
    begin = HFTokenizer.from_file(str(tools_path / "tokenizer.json")).token_to_id(CALLS_BEGIN)
    client = servers(fmt).client()
    tools = [{**t, "function": {**t["function"], "strict": True}} for t in (WEATHER, CLOCK)]
    body = dict(model="tiny", messages=USER, tools=tools, max_tokens=300, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**body, logit_bias={str(begin): 100}).choices[0]
    assert whole.finish_reason == "tool_calls"
    calls = check_calls(whole.message)
    streamed = client.chat.completions.create(**body, logit_bias={str(begin): 100}, stream=True)
    assert assemble(streamed) == ("", calls, "tool_calls")
    free = client.chat.completions.create(**body, logit_bias={str(begin): -100}).choices[0]
    assert free.message.content and not free.message.tool_calls and free.finish_reason in ("stop", "length")


def test_auto_and_none_stream_like_the_whole_answer(servers):
    client = servers("deepseek_v31").client()
    for choice in ("auto", "none"):
        body = dict(model="tiny", messages=USER, tools=[WEATHER], tool_choice=choice, max_tokens=12, temperature=0)
        whole = client.chat.completions.create(**body).choices[0]
        content, calls, finish = assemble(client.chat.completions.create(**body, stream=True))
        expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        assert (content, calls, finish) == (whole.message.content or "", expected, whole.finish_reason)


def test_a_conversation_with_calls_and_results(servers):
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    out = servers("deepseek_v31").client().chat.completions.create(model="tiny", messages=history, tools=[WEATHER],
                                                                   max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls") and out.usage.prompt_tokens > 20


def test_reasoning_then_a_forced_call(tmp_path_factory):
    path = with_tools_template(tiny_model(tmp_path_factory, "scripted")[0], tmp_path_factory, "tools-scripted")
    srv = ThreadServer(path, reasoning_parser="deepseek_r1", tool_call_parser="deepseek_v31", max_model_len=512).start()
    try:
        client = srv.client()
        body = dict(model="tiny", messages=USER, tools=[WEATHER], max_tokens=300, temperature=0,
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
        message = client.chat.completions.create(**body).choices[0].message
        assert message.reasoning_content == REASONING
        calls = check_calls(message, "get_weather")
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                            for c in client.chat.completions.create(**body, stream=True) if c.choices)
        assert reasoning == REASONING
        assert assemble(client.chat.completions.create(**body, stream=True))[1] == calls
    finally:
        srv.stop()


def test_vllm_tool_flags_parse():
    args = parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v3"])
    assert args.tool_call_parser == "deepseek_v3" and args.enable_auto_tool_choice
    with pytest.raises(SystemExit):
        parse_args(["--tool-call-parser", "hermes"])
