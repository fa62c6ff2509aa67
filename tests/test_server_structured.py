"""Structured output, logit_bias and the smaller API contracts, through the openai client on a tiny
random model: response_format (json_schema, json_object) and vLLM's guided_* fields always parse and
validate, streamed or not; a bias of 100 forces its token; GET /v1/models/{id}; prompt scoring with
max_tokens 0 and echo; integral floats for integers; text_offset into text; lone surrogates and
limits answered with a 400 that names them, on a connection that stays usable."""

import json
import re

import httpx
import jsonschema_rs
import openai
import pytest

from test_server import ThreadServer, tiny_model

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"], "properties": {
    "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}}}
MESSAGES = [{"role": "user", "content": "a person as JSON"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    srv = ThreadServer(path, max_model_len=256).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}])
def test_json_schema_response_format_streamed_and_not(server, sampling):
    client = server.client()
    body = dict(model="tiny", messages=MESSAGES, max_tokens=200, n=2, **sampling,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    whole = client.chat.completions.create(**body)
    for choice in whole.choices:
        assert choice.finish_reason == "stop" and jsonschema_rs.is_valid(PERSON, json.loads(choice.message.content))
    texts = ["", ""]
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


def test_json_object_and_guided_fields_on_both_endpoints(server):
    client = server.client()
    close = server.worker.engine.tokenizer.encode("}", add_special_tokens=False)[0]  # a random model's objects run on
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0,
                                         response_format={"type": "json_object"}, logit_bias={str(close): 30})
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].message.content), dict)
    cases = [({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
             ({"guided_regex": r"[a-c]{2}-[0-9]{1,3}"}, lambda t: re.fullmatch(r"[a-c]{2}-[0-9]{1,3}", t)),
             ({"guided_json": PERSON}, lambda t: jsonschema_rs.is_valid(PERSON, json.loads(t))),
             ({"structured_outputs": {"choice": ["x", "y"]}}, lambda t: t in ("x", "y")),
             ({"guided_grammar": 'start: "f(" NUM ")"\nNUM: /[0-9]{1,4}/'}, lambda t: re.fullmatch(r"f\([0-9]{1,4}\)", t))]
    for extra, valid in cases:
        completion = client.completions.create(model="tiny", prompt="x =", max_tokens=200, temperature=0, extra_body=extra)
        text = completion.choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="x =", max_tokens=200, temperature=0, extra_body=extra, stream=True) if c.choices)
        assert completion.choices[0].finish_reason == "stop" and valid(text) and streamed == text, extra
        chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, temperature=1.0, seed=1,
                                              extra_body=extra)
        assert valid(chat.choices[0].message.content), extra


def test_logit_bias_forces_a_token_in_chat_and_completions(server):
    client = server.client()
    tokens = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=1, logprobs=0, temperature=0)
    first = tokens.choices[0].logprobs.tokens[0]
    target = 42 if first != server.worker.engine.tokenizer.decode([42]) else 43
    text = server.worker.engine.tokenizer.decode([target] * 3)
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=1.0, seed=3,
                                    logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == text
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0,
                                          logit_bias={str(target): 100}, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=3, logit_bias={"5": 100.5})
    assert e.value.body["param"] == "logit_bias" and "100" in e.value.body["message"]


def test_model_card_by_id(server):
    client = server.client()
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_scoring_a_prompt_with_max_tokens_0_and_echo(server):
    prompt = [0, 17, 42, 99, 123]
    body = {"model": "tiny", "prompt": [prompt], "max_tokens": 0, "echo": True, "logprobs": 1}
    scored = server.post("/v1/completions", body).json()
    one = server.post("/v1/completions", {**body, "max_tokens": 1, "temperature": 0}).json()
    lp, ref = scored["choices"][0]["logprobs"], one["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == ref["token_logprobs"][:-1] and len(lp["tokens"]) == len(prompt)
    assert scored["choices"][0]["text"] == server.worker.engine.tokenizer.decode(prompt, skip_special_tokens=False)
    assert scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["finish_reason"] == "length"
    chunks = [json.loads(e[6:]) for e in server.post("/v1/completions", {**body, "stream": True, "stream_options": {
        "include_usage": True}}).text.split("\n\n") if e.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == scored["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 0


def test_integral_floats_are_integers(server):
    out = server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2.0, "n": 2.0, "seed": 3.0, "top_k": 5.0,
                                          "ignore_eos": True}).json()
    assert len(out["choices"]) == 2 and out["usage"]["completion_tokens"] == 4
    assert server.post("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 1.0}).status_code == 200
    assert server.post("/v1/completions", {"prompt": [5.0, 6.0], "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("echo", [True, False])
def test_text_offset_indexes_text(server, echo):
    body = {"prompt": "héllo wörld 🙂", "max_tokens": 6, "logprobs": 0, "echo": echo, "temperature": 0, "ignore_eos": True}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    check_offsets(choice["text"], choice["logprobs"])
    streamed = [json.loads(e[6:])["choices"][0] for e in server.post("/v1/completions", {**body, "stream": True}).text.split(
        "\n\n") if e.startswith("data: {")]
    lp = {key: [x for c in streamed for x in c["logprobs"][key]] for key in ("tokens", "text_offset")}
    assert lp["tokens"] == choice["logprobs"]["tokens"]
    check_offsets("".join(c["text"] for c in streamed), lp)


def check_offsets(text: str, lp: dict) -> None:
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    for token, start in zip(lp["tokens"], lp["text_offset"]):
        if "\ufffd" not in token and not token.startswith("<｜"):  # a whole token's text is where its offset says
            assert text[start:].startswith(token), (token, start, text)


def test_lone_surrogates_are_a_400_and_the_connection_stays_usable(server):
    with httpx.Client(base_url=server.url, headers={**server.headers, "Content-Type": "application/json"}) as client:
        for route, body, param in [("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
                                   ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages"),
                                   ("/v1/chat/completions", b'{"messages": [{"role": "\\ud83d", "content": "x"}]}', "messages"),
                                   ("/v1/completions", b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias")]:
            r = client.post(route, content=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "Unicode" in r.json()["error"]["message"] and r.headers.get("connection") != "close"
            assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_limits_are_named_in_the_error(server):
    many = server.post("/v1/completions", {"prompt": ["a"] * 65, "max_tokens": 1}).json()["error"]
    assert many["param"] == "prompt" and "65" in many["message"] and "64" in many["message"]
    stops = server.post("/v1/completions", {"prompt": "a", "stop": ["x"] * 1000}).json()["error"]
    assert stops["param"] == "stop" and "1000" in stops["message"] and "16" in stops["message"]
