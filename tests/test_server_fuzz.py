"""Fuzzing: schemathesis on every route of the server's OpenAPI schema (bodies that fit it and bodies that
do not), then hypothesis on mostly-valid sampling requests that reach the engine. No request may get a
5xx, and every 200 is well formed. Bounded: a 24-token context and a fixed number of examples."""

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from test_server import ThreadServer, tiny_model

EXAMPLES = 40  # per route and mode


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    srv = ThreadServer(path, max_model_len=24, max_num_seqs=16).start()
    yield srv
    srv.stop()


@pytest.fixture
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers=fuzz_server.headers)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_route_answers_5xx(case, fuzz_server):
    response = case.call(headers=fuzz_server.headers, timeout=30)
    assert response.status_code < 500, (case.body, response.text)


def knobs(**extra) -> st.SearchStrategy[dict]:
    floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False)  # noqa: E731
    return st.fixed_dictionaries({}, optional={
        "temperature": floats(0, 2), "top_p": floats(0.01, 1), "top_k": st.integers(-1, 40), "min_p": floats(0, 1),
        "presence_penalty": floats(-2, 2), "frequency_penalty": floats(-2, 2), "repetition_penalty": floats(0.5, 2),
        "max_tokens": st.integers(1, 12), "min_tokens": st.integers(0, 3), "n": st.integers(1, 3),
        "seed": st.integers(0, 2**31), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
        "stream": st.booleans(), "ignore_eos": st.booleans(), "stream_options": st.just({"include_usage": True}), **extra})


SCHEMAS = st.sampled_from([{"type": "object"}, {"type": "integer", "maximum": 9}, {"enum": ["a", "b"]}, {"type": "objectx"},
                           {"type": "array", "maxItems": 2}, {"properties": 3}, "not a schema"])
SURROGATES = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=2).map(lambda s: "a" + s)
TOOLS = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "bad name"])}, optional={"parameters": SCHEMAS})}), max_size=2)
CONSTRAINTS = {  # fields that turn on grammars, bias, tools, and strings no encoder takes
    "response_format": st.one_of(st.just({"type": "json_object"}), SCHEMAS.map(
        lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}})),
    "guided_regex": st.sampled_from(["[a-c]{1,3}", "(", "x*"]), "guided_choice": st.lists(st.text(max_size=3), max_size=3),
    "logit_bias": st.dictionaries(st.sampled_from(["5", "319", "320", "-1", "x"]), st.floats(-150, 150), max_size=3),
    "max_tokens": st.integers(0, 12), "user": SURROGATES}
PROMPTS = st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(0, 319), min_size=1, max_size=12),
                    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3), SURROGATES)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": st.text(max_size=30)}), min_size=1, max_size=3)
BODIES = st.one_of(
    st.tuples(st.just("/v1/completions"), st.fixed_dictionaries({"prompt": PROMPTS}).flatmap(
        lambda base: knobs(echo=st.booleans(), logprobs=st.integers(0, 5), **CONSTRAINTS).map(lambda k: {**base, **k}))),
    st.tuples(st.just("/v1/chat/completions"), st.fixed_dictionaries({"messages": MESSAGES}).flatmap(
        lambda base: knobs(logprobs=st.booleans(), top_logprobs=st.integers(0, 5), tools=TOOLS, **CONSTRAINTS,
                           tool_choice=st.sampled_from(["auto", "none", "required", {"type": "function", "function": {
                               "name": "f"}}])).map(lambda k: {**base, **k}))))


@given(BODIES)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_random_sampling_requests_are_served_or_refused_cleanly(fuzz_server, route_body):
    route, body = route_body
    r = fuzz_server.post(route, body)
    assert r.status_code in (200, 400), (body, r.text)
    if r.status_code == 400:
        return
    if not body.get("stream"):
        assert len(r.json()["choices"]) >= body.get("n", 1)
        return
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    assert ("usage" in chunks[-1]) == ("stream_options" in body)
