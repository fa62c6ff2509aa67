"""Every bad request gets OpenAI's error body with the right status and `param`, and no engine work:
ranges, types, context length, empty prompts, token ids, stops, templates, auth, body size, encoding."""

import json

import httpx
import openai
import pytest

from test_server import KEY, MODEL_LEN, ThreadServer, tiny_model

C, H = "/v1/completions", "/v1/chat/completions"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
BASE = {C: {"prompt": "hi", "max_tokens": 4}, H: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}
NAN, INF = float("nan"), float("inf")

CASES = [  # route, changes to the base body, status, param
    (C, {"max_tokens": 200}, 400, "max_tokens"), (H, {"max_completion_tokens": 500}, 400, "max_completion_tokens"),
    (C, {"prompt": [5] * MODEL_LEN}, 400, "prompt"), (C, {"prompt": [5] * 300, "max_tokens": None}, 400, "prompt"),
    (C, {"max_tokens": 0}, 400, "max_tokens"), (C, {"max_tokens": -1}, 400, "max_tokens"),
    (H, {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (C, {"temperature": NAN}, 400, "temperature"), (C, {"temperature": INF}, 400, "temperature"),
    (C, {"temperature": -0.1}, 400, "temperature"), (H, {"temperature": 2.5}, 400, "temperature"),
    (C, {"top_p": 0}, 400, "top_p"), (C, {"top_p": 1.5}, 400, "top_p"), (H, {"top_k": -2}, 400, "top_k"),
    (C, {"min_p": -0.1}, 400, "min_p"), (C, {"min_p": 1.5}, 400, "min_p"),
    (C, {"presence_penalty": 2.5}, 400, "presence_penalty"), (H, {"frequency_penalty": -3}, 400, "frequency_penalty"),
    (C, {"repetition_penalty": 0}, 400, "repetition_penalty"), (C, {"min_tokens": 9}, 400, "min_tokens"),
    (C, {"n": 0}, 400, "n"), (H, {"n": 17}, 400, "n"),
    (C, {"logprobs": 21}, 400, "logprobs"), (C, {"logprobs": -1}, 400, "logprobs"),
    (H, {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"), (H, {"top_logprobs": 2}, 400, "top_logprobs"),
    (C, {"stop": ""}, 400, "stop"), (H, {"stop": ["ok", ""]}, 400, "stop"), (C, {"stop": ["x"] * 17}, 400, "stop"),
    (C, {"prompt": ""}, 400, "prompt"), (C, {"prompt": []}, 400, "prompt"), (C, {"prompt": [[]]}, 400, "prompt"),
    (C, {"prompt": ["a", ""]}, 400, "prompt"), (H, {"messages": []}, 400, "messages"),
    (C, {"prompt": [5, -1]}, 400, "prompt"), (C, {"prompt": [[5], [320]]}, 400, "prompt"),
    (C, {"temperature": "hot"}, 400, "temperature"), (C, {"max_tokens": 1.5}, 400, "max_tokens"),
    (C, {"max_tokens": True}, 400, "max_tokens"), (H, {"messages": "hi"}, 400, "messages"),
    (H, {"messages": [{"content": "no role"}]}, 400, "messages"), (C, {"stream": "yes"}, 400, "stream"),
    (C, {"seed": 2**70}, 400, "seed"), (C, {"prompt": None}, 400, "prompt"),
    (C, {"logit_bias": {"abc": 5}}, 400, "logit_bias"), (H, {"logit_bias": {"7": 1e9}}, 400, "logit_bias"),
    (H, {"chat_template": "{{ messages }}"}, 400, "chat_template"),
    (H, {"chat_template_kwargs": {"thinking": True}}, 400, "chat_template_kwargs"),
    (H, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),  # the template's raise_exception
    (H, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    (H, {"tools": [{"type": "function"}]}, 400, "tools"),
    (H, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}}, 400,
     "response_format"), (H, {"response_format": {"type": "json_schema"}}, 400, "response_format"),
    (H, {"response_format": {"type": "xml"}}, 400, "response_format"),
    (H, {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    (H, {"tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    (H, {"tool_choice": "required"}, 400, "tool_choice"), (H, {"tools": [TOOL], "tool_choice": "sometimes"}, 400, "tool_choice"),
    (H, {"tools": [TOOL, TOOL]}, 400, "tools"), (H, {"tools": [{**TOOL, "function": {"name": "bad name!"}}]}, 400, "tools"),
    (H, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]}, 400, "tools"),
    (H, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 400, "tools"),
    (H, {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    (H, {"tools": [{**TOOL, "function": {**TOOL["function"], "strict": True}}], "guided_regex": "a+"}, 400, "tools"),
    (C, {"guided_regex": "[a-"}, 400, "guided_regex"), (C, {"guided_choice": []}, 400, "guided_choice"),
    (C, {"guided_json": "{not json"}, 400, "guided_json"), (H, {"guided_grammar": "start: ("}, 400, "guided_grammar"),
    (C, {"guided_regex": "a", "guided_choice": ["b"]}, 400, "guided_choice"),
    (C, {"response_format": {"type": "json_object"}, "guided_regex": "a"}, 400, "response_format"),
    (C, {"logit_bias": {"320": 1}}, 400, "logit_bias"), (C, {"logit_bias": {"5": -101}}, 400, "logit_bias"),
    (H, {"logit_bias": {"-5": 1}}, 400, "logit_bias"), (C, {"logit_bias": {"5": "x"}}, 400, "logit_bias"),
    (C, {"suffix": "return x"}, 400, "suffix"), (C, {"best_of": 2}, 400, "best_of"), (C, {"max_tokens": 0}, 400, "max_tokens"),
    (C, {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    (H, {"stream": False, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (H, {"functions": [{"name": "f"}]}, 400, "functions"), (H, {"modalities": ["text", "audio"]}, 400, "modalities"),
    (C, {"use_beam_search": True}, 400, "use_beam_search"), (H, {"echo": True}, 400, "echo"),
    (C, {"prompt": "\ud800"}, 400, "prompt"), (C, {"prompt": ["ok", "a\udfff"]}, 400, "prompt"),
    (H, {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    (H, {"messages": [{"role": "\ud800", "content": "hi"}]}, 400, "messages"), (C, {"stop": ["\ud800"]}, 400, "stop"),
    (C, {"model": "gpt-4"}, 404, "model"), (H, {"model": "TINY"}, 404, "model"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    srv = ThreadServer(path, max_body_bytes=64 * 1024).start()
    yield srv
    srv.stop()


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("route,changes,status,param", CASES)
def test_bad_request_is_rejected_naming_the_parameter(server, route, changes, status, param):
    before = server.metrics()["moela:prompt_tokens_total"]
    body = {k: v for k, v in {**BASE[route], **changes}.items() if v is not None}
    error = error_of(server.post(route, json.dumps(body).encode()), status)
    assert error["param"] == param, error
    assert server.metrics()["moela:prompt_tokens_total"] == before  # no engine work was done


def test_context_error_names_both_numbers_and_missing_max_tokens_means_the_rest(server):
    prompt = [5 + i for i in range(100)]
    message = error_of(server.post(C, {"prompt": prompt, "max_tokens": 40}), 400)["message"]
    assert "100" in message and "40" in message and str(MODEL_LEN) in message
    out = server.post(C, {"prompt": prompt, "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == MODEL_LEN - 100 and out["choices"][0]["finish_reason"] == "length"
    template_error = error_of(server.post(H, {**BASE[H], "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert "unknown role: robot" in template_error["message"]


def test_openai_client_sees_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-wrong").models.list()


@pytest.mark.parametrize("route", ["/v1/models", "/metrics", C, H, "/v1/unknown", "/openapi.json"])
@pytest.mark.parametrize("auth", [None, "Bearer sk-wrong", f"Bearer {KEY.upper()}", f"Bearer {KEY.lower()}", KEY,
                                  f"Basic {KEY}", "Bearer", f"Bearer {KEY}x"])
def test_every_route_but_health_needs_the_exact_key(server, route, auth):
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    r = httpx.request("POST" if route in (C, H) else "GET", server.url + route, headers=headers,
                      content=json.dumps(BASE.get(route, {})))
    assert error_of(r, 401)["type"] == "authentication_error"


def test_health_is_open_and_a_valid_key_passes(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_body_over_the_limit_is_413_before_parsing(server):
    big = json.dumps({**BASE[C], "user": "x" * 100_000}).encode()
    assert error_of(server.post(C, big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        for _ in range(100):
            yield b" " * 1024

    assert error_of(server.post(C, chunks()), 413)["code"] == "request_too_large"
    assert server.post(C, BASE[C]).status_code == 200


def test_non_json_bad_utf8_and_wrong_content_type(server):
    assert error_of(server.post(C, b'{"prompt": "hi", "max_tokens": '), 400)["param"] is None
    assert error_of(server.post(C, b'{"prompt": "\xff\xfe", "max_tokens": 2}'), 400)
    assert error_of(server.post(C, b"[1, 2]"), 400)
    assert error_of(server.post(C, b""), 400)
    assert error_of(server.post(C, b"\x00\x01garbage"), 400)
    assert error_of(server.post(C, json.dumps(BASE[C]).encode(), headers={"Content-Type": "text/plain"}), 415)
    form = server.post(C, b"prompt=hi", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert error_of(form, 415)


def test_oversized_headers_are_refused_and_the_server_lives_on(server):
    for size in (200_000, 1_000_000):
        try:
            r = httpx.get(f"{server.url}/v1/models", headers={**server.headers, "X-Big": "y" * size})
            assert r.status_code in (400, 431)
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
            pass  # answered 400 and closed while the client was still sending
    assert httpx.get(f"{server.url}/v1/models", headers=server.headers).status_code == 200
