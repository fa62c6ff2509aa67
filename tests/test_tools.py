"""Tool calls (server/tools.py): each DeepSeek format parsed from text as its chat template writes it,
streamed at every split point into deltas that add up to the whole parse; the forcing grammar of each
format, walked at random by llguidance, always parses back into calls valid against their schemas;
the tools reach the template (or the system message) and assistant calls render in the format."""

import json
import random
from types import SimpleNamespace

import jsonschema_rs
import numpy as np
import pytest
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer as HFTokenizer

from conftest import make_tokenizer
from moela.server.chat import render
from moela.server.endpoints import Serving
from moela.server.protocol import ApiError, ChatMessage
from moela.server.tools import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, FORMATS, SEP, ToolCallStream, call_grammar,
                                detect_format)
from moela.tokenizer import Tokenizer

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}
NOARGS = {"name": "now", "parameters": {"type": "object", "properties": {}}}
CALLS = [("get_weather", {"city": "Paris <3", "unit": "c", "days": 2}), ("now", {})]


def written(fmt: str, calls: list[tuple[str, dict]], content: str = "Let me look.") -> str:
    """What a model trained on `fmt` writes for these calls (the layout its chat template renders)."""
    if fmt == "deepseek_v3":
        body = "\n".join(f"{CALL_BEGIN}function{SEP}{n}\n```json\n{json.dumps(a)}\n```{CALL_END}" for n, a in calls)
        return f"{content}{CALLS_BEGIN}{body}{CALLS_END}"
    if fmt == "deepseek_v31":
        return content + CALLS_BEGIN + "".join(f"{CALL_BEGIN}{n}{SEP}{json.dumps(a)}{CALL_END}" for n, a in calls) + CALLS_END
    block = FORMATS[fmt].begin.strip("<>")

    def param(k, v):
        raw, is_str = (v, "true") if isinstance(v, str) else (json.dumps(v), "false")
        return f'<｜DSML｜parameter name="{k}" string="{is_str}">{raw}</｜DSML｜parameter>'

    invokes = "\n".join(f'<｜DSML｜invoke name="{n}">\n' + "\n".join(param(k, v) for k, v in a.items()) +
                        "\n</｜DSML｜invoke>" for n, a in calls)
    return f"{content}\n\n<{block}>\n{invokes}\n</{block}>"


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_parses_what_its_template_writes(fmt):
    content, calls = FORMATS[fmt].parse(written(fmt, CALLS), final=True)
    assert content == "Let me look." and [(n, json.loads(a)) for n, a in calls] == CALLS
    assert FORMATS[fmt].parse("no calls here ", final=True) == ("no calls here ", [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_deltas_add_up_to_the_whole_parse_at_every_split(fmt):
    text = written(fmt, CALLS)
    content, calls = FORMATS[fmt].parse(text, final=True)
    for cuts in [[k] for k in range(1, len(text))] + [sorted(random.Random(s).sample(range(1, len(text)), 8))
                                                      for s in range(20)]:
        stream, pieces = ToolCallStream(FORMATS[fmt]), [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        got_content, names, args = "", {}, {}
        for i, piece in enumerate(pieces):
            delta, entries = stream.feed(piece, final=i == len(pieces) - 1)
            got_content += delta
            for e in entries:
                if "id" in e:
                    assert e["index"] not in names and e["type"] == "function"
                    names[e["index"]] = e["function"]["name"]
                args[e["index"]] = args.get(e["index"], "") + e["function"]["arguments"]
        assert got_content == content and [(names[i], args[i]) for i in sorted(names)] == calls, cuts


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = written("deepseek_v31", CALLS)
    stream = ToolCallStream(FORMATS["deepseek_v31"], parallel=False)
    entries = [e for piece in (text[:40], text[40:]) for e in stream.feed(piece)[1]] + stream.feed("", final=True)[1]
    assert len(CALLS) > 1 and {e["index"] for e in entries} == {0}
    assert json.loads("".join(e["function"]["arguments"] for e in entries)) == CALLS[0][1]


def test_unfinished_call_and_held_back_markers():
    fmt = FORMATS["deepseek_v31"]
    assert fmt.parse("hi <｜tool▁ca", final=False) == ("hi", [])  # could be the start of the block
    assert fmt.parse("hi <｜tool▁ca", final=True) == ("hi <｜tool▁ca", [])
    cut = f'{CALLS_BEGIN}{CALL_BEGIN}f{SEP}{{"a": 1'
    assert fmt.parse(cut, final=False) == ("", [("f", '{"a": 1')])
    assert fmt.parse(cut + "<｜tool▁call▁e", final=False) == ("", [("f", '{"a": 1')])
    dsml = FORMATS["deepseek_v32"]
    partial = '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">[1, 2'
    assert dsml.parse(partial, final=False) == ("", [("f", "{")]) and dsml.parse(partial, final=True) == ("", [("f", "{}")])


def test_format_detection():
    assert detect_format("deepseek_v4", None).name == "deepseek_v4"
    assert detect_format("deepseek_v32", None).name == "deepseek_v32"
    assert detect_format("deepseek_v3", "...<｜tool▁sep｜>' + name + '\\n```json\\n'...").name == "deepseek_v3"
    assert detect_format("deepseek_v3", "{{ messages }}").name == "deepseek_v31"


@pytest.fixture(scope="module")
def lltok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools-tok")
    make_tokenizer(path)
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP])
    tok.add_tokens(["</think>"])
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    return tok, LLTokenizer(tok.to_str(), eos_token=[1]), lambda s: f"<[{added[s]}]>" if s in added else json.dumps(s)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,think", [(None, False), ("get_weather", True)])
def test_forcing_grammar_always_parses_into_valid_calls(lltok, fmt, name, think):
    tok, ll, token = lltok
    grammar = LLMatcher.grammar_from_lark(call_grammar(FORMATS[fmt], [WEATHER, NOARGS], name, True, token, think))
    assert not LLMatcher.validate_grammar_with_warnings(grammar, ll)[0]
    finished = 0
    for seed in range(12):
        text = walk(ll, tok, grammar, random.Random(seed))
        if text is None:
            continue  # a random walk through a free string may not end within the budget
        finished += 1
        if think:
            text = text.split("</think>", 1)[1]
        content, calls = FORMATS[fmt].parse(text, final=True)
        assert content == "" and calls and (name is None or [n for n, _ in calls] == [name])
        if FORMATS[fmt].dsml and "get_weather" in dict(calls):  # an enum of strings is written as its chat template would
            assert 'name="unit" string="true">' in text
        for n, args in calls:
            schema = {"get_weather": WEATHER, "now": NOARGS}[n]["parameters"]
            assert jsonschema_rs.is_valid(schema, json.loads(args)), (n, args)
    assert finished >= 3


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("think", [False, True])
def test_optional_calls_grammar_takes_content_or_valid_calls_only(lltok, fmt, think):
    tok, ll, token = lltok
    city = {"name": "city", "parameters": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "days": {"type": "integer"}}}}
    grammar = LLMatcher.grammar_from_lark(call_grammar(FORMATS[fmt], [city, NOARGS], None, True, token, think, True))

    def accepts(text: str) -> bool:
        text = ("Hmm, <b> or not.</think>" if think else "") + text
        matcher = LLMatcher(ll, grammar, log_level=0)
        ids = tok.encode(text, add_special_tokens=False).ids
        return all(matcher.consume_token(t) for t in ids) and (matcher.is_stopped() or matcher.consume_token(1))

    paris = ("city", {"name": "Paris", "days": 2})
    assert accepts("Just text, <no call>.") and accepts(written(fmt, [paris])) and accepts(written(fmt, [paris] * 2))
    assert not accepts(written(fmt, [("city", {"days": 2})]))  # a required argument missing
    assert not accepts(written(fmt, [("other", {})]))


def walk(ll: LLTokenizer, tok: HFTokenizer, grammar: str, rng: random.Random, budget: int = 300) -> str | None:
    """A random path through the grammar, preferring tokens that close something; None if it did not end."""
    matcher, out = LLMatcher(ll, grammar), []
    while not matcher.is_stopped():
        if len(out) == budget:
            return None
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.nonzero(bits[: ll.vocab_size])[0].tolist()
        closing = [t for t in allowed if t >= 300 or any(c in tok.decode([t], skip_special_tokens=False) for c in '"}]<>')]
        token = rng.choice(closing if closing and rng.random() < 0.7 else allowed)
        assert matcher.consume_token(token), matcher.get_error()
        out.append(token)
    return tok.decode(out, skip_special_tokens=False)


def stub_serving(path, template: str, parser: str) -> Serving:
    """A Serving over just a tokenizer with this chat template (render needs no engine)."""
    base = Tokenizer.from_pretrained(path)
    tokenizer = Tokenizer(base.tok, {"bos_token": base.bos_token, "eos_token": base.eos_token}, template)
    engine = SimpleNamespace(tokenizer=tokenizer, model_cfg=SimpleNamespace(model_type="deepseek_v3"))
    return Serving(SimpleNamespace(engine=engine), "m", reasoning=False, tool_call_parser=parser)


TEMPLATE = ("{% for m in messages %}[{{ m.role }}]{{ m.content if m.content is not none else '' }}"
            "{% for c in m.tool_calls or [] %}<call {{ c.function.name }} {{ c.function.arguments | tojson }}>{% endfor %}"
            "{% if m.tool_call_id %}<for {{ m.tool_call_id }}>{% endif %}{% endfor %}{% if tools %}"
            "{% for t in tools %}<tool {{ t.function.name }}>{% endfor %}{% endif %}")


@pytest.mark.parametrize("parser", ["deepseek_v31", "deepseek_v32"])
def test_tools_and_calls_reach_the_template(tmp_path, parser):
    make_tokenizer(tmp_path)
    messages = [ChatMessage(role="user", content="weather?"),
                ChatMessage(role="assistant", content=None, tool_calls=[
                    {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]),
                ChatMessage(role="tool", content="-3", tool_call_id="c1")]
    serving = stub_serving(tmp_path, TEMPLATE, parser)
    text = serving.tokenizer.decode(render(serving, messages, [WEATHER]), skip_special_tokens=False)
    arguments = '"{\\"city\\": \\"Oslo\\", \\"unit\\": \\"c\\"}"' if parser == "deepseek_v31" else '{"city": "Oslo", "unit": "c"}'
    assert f"[assistant]<call get_weather {arguments}>[tool]-3<for c1><tool get_weather>" in text
    plain = stub_serving(tmp_path, TEMPLATE[: TEMPLATE.index("{% if tools %}")], parser)
    text = plain.tokenizer.decode(render(plain, messages, [WEATHER]), skip_special_tokens=False)
    assert text.startswith("[system]You can call the functions") and FORMATS[parser].begin in text
    bad = [ChatMessage(role="assistant", tool_calls=[{"function": {"name": "f", "arguments": "[1]"}}])]
    if parser == "deepseek_v32":
        with pytest.raises(ApiError, match="JSON object"):
            render(serving, bad, [WEATHER])
