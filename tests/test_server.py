"""The OpenAI-compatible server, against a real uvicorn server on 127.0.0.1 driven by the `openai`
client and raw httpx: endpoints, streaming, logprobs, validation errors, auth, body limits.

Also the harness the other tests/test_server_*.py files import: tiny model directories and
ThreadServer (uvicorn + EngineWorker in a thread, on a free loopback port).
"""

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from conftest import build_hf, make_tokenizer
from moela.engine.config import EngineConfig
from moela.engine.llm import LLMEngine
from moela.server.app import ServerConfig, build_app
from moela.server.cli import DrainingServer
from moela.server.worker import EngineWorker

KEY = "sk-test-Key"
MODEL_LEN = 128
REASONING, ANSWER = "so: fib", " café"  # chosen so that every token of the script is distinct
_MODELS: dict[str, tuple[Path, torch.nn.Module]] = {}  # built once per session, shared by the server test files


def tiny_model(tmp_path_factory, kind: str = "random") -> tuple[Path, torch.nn.Module]:
    """'random': a tiny random V3 with a byte-level BPE; 'scripted': one whose reply to any chat prompt is
    `<think>REASONING</think>ANSWER` then EOS."""
    if kind not in _MODELS:
        path = tmp_path_factory.mktemp(f"server-{kind}")
        hf = build_hf("v3", seed=0 if kind == "random" else 1, vocab_size=320, max_position_embeddings=4 * MODEL_LEN)
        make_tokenizer(path, vocab_size=300)
        if kind == "scripted":
            script(path, hf)
        hf.save_pretrained(path)
        _MODELS[kind] = (path, hf)
    return _MODELS[kind]


@torch.no_grad()
def script(path: Path, hf: torch.nn.Module) -> None:
    """Zero every attention/MLP output so the last hidden state is the current token's embedding (a bigram
    model), then point the LM head along a chain of distinct tokens: Assistant -> <think> ... ANSWER -> EOS."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens(["<think>", "</think>"])
    tok.save(str(path / "tokenizer.json"))
    chain = [3] + tok.encode(f"<think>{REASONING}</think>{ANSWER}", add_special_tokens=False).ids + [1]
    assert len(set(chain)) == len(chain), chain
    for name, p in hf.named_parameters():
        if "o_proj" in name or "down_proj" in name:
            p.zero_()
    hf.model.norm.weight.fill_(1.0)
    emb, head = hf.model.embed_tokens.weight, hf.lm_head.weight
    head.zero_()
    for a, b in zip(chain, chain[1:]):
        head[b] = 3 * emb[a] / emb[a].norm()


class ThreadServer:
    """A real uvicorn server on a free 127.0.0.1 port, in a thread, serving one EngineWorker."""

    def __init__(self, path: Path, api_key: str | None = KEY, reasoning_parser: str | None = None,
                 cors_origins: tuple[str, ...] = (), max_body_bytes: int = 256 * 1024, max_queued_requests: int = 64,
                 build=None, tool_call_parser: str | None = None, **engine_kwargs):
        engine_kwargs = {"dtype": "float32", "max_model_len": MODEL_LEN, "block_size": 16, **engine_kwargs}
        cfg = EngineConfig(model=path, **engine_kwargs)
        self.worker = EngineWorker(build or (lambda: LLMEngine(cfg)), capacity=cfg.max_num_seqs + max_queued_requests)
        self.name = "tiny"
        app = build_app(self.worker, ServerConfig(self.name, api_key, list(cors_origins), reasoning_parser, max_body_bytes,
                                                  tool_call_parser))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = DrainingServer(config, self.worker, drain_timeout=1.0)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def start(self, wait_ready: bool = True) -> "ThreadServer":
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn to start")
        if wait_ready:
            wait_for(lambda: httpx.get(f"{self.url}/health").status_code == 200, 30, "/health 200")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(**{"base_url": f"{self.url}/v1", "api_key": KEY, "max_retries": 0, "timeout": 60, **kwargs})

    def post(self, route: str, body, **kwargs) -> httpx.Response:
        content = body if not isinstance(body, (dict, list)) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **self.headers, **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{route}", content=content, headers=headers, timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers).text
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a streamed response; asserts the framing."""
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in response.text.split("\n\n") if line)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    return events[:-1]


def stream(server: ThreadServer, route: str, body: dict) -> list[dict]:
    r = server.post(route, {**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    return [json.loads(e) for e in sse_events(r)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    srv = ThreadServer(path).start()
    yield srv
    srv.stop()


def test_health_models_and_a_completion_through_the_openai_client(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready"}  # no key needed
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4


def test_cached_tokens_reported_for_a_repeated_prompt(server):
    prompt = [5 + i % 250 for i in range(40)]
    first = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 2}).json()
    second = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 2}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 32  # two full 16-token blocks


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "top_p": 0.9}])
def test_streamed_text_equals_non_streamed(server, sampling):
    body = {"prompt": "for i in range(10):", "max_tokens": 12, "ignore_eos": True, **sampling}
    whole = server.post("/v1/completions", body).json()["choices"][0]["text"]
    chunks = stream(server, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert all("usage" not in c for c in chunks)  # no include_usage, no usage chunk
    chat = {"messages": [{"role": "user", "content": "héllo wörld 🙂"}], "max_tokens": 12, "ignore_eos": True, **sampling}
    whole = server.post("/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    chunks = stream(server, "/v1/chat/completions", chat)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_usage_chunk_only_with_include_usage(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    chunks = stream(server, "/v1/chat/completions", body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]}
    assert all("usage" not in c for c in chunks[:-1])


def test_openai_client_streaming(server):
    client = server.client()
    pieces = client.completions.create(model="tiny", prompt="héllo", max_tokens=6, temperature=0, stream=True)
    text = "".join(chunk.choices[0].text for chunk in pieces)
    assert text == client.completions.create(model="tiny", prompt="héllo", max_tokens=6, temperature=0).choices[0].text


def test_echo_logprobs_give_prompt_loglikelihood_like_lm_eval(server, tmp_path_factory):
    """lm-evaluation-harness local-completions: token ids, echo, logprobs=1, max_tokens=1; reads [ctxlen:-1]."""
    _, hf = tiny_model(tmp_path_factory)
    prompt = [0, 17, 42, 99, 123, 7, 250]
    body = {"model": "tiny", "prompt": [prompt], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    want = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert lp["token_logprobs"][1:-1] == pytest.approx(want, abs=1e-3)
    for token_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert max(top.values()) >= token_lp - 1e-6  # lm-eval's is_greedy check reads these
    assert lp["top_logprobs"][-1] and max(lp["top_logprobs"][-1].values()) == pytest.approx(lp["token_logprobs"][-1])
    assert choice["text"].startswith(lp["tokens"][0]) and lp["tokens"][0] == "<｜begin▁of▁sentence｜>"  # echo


def test_n_samples_and_prompt_lists_number_their_choices(server):
    body = {"prompt": ["def fib", "import os"], "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 3}
    out = server.post("/v1/completions", body).json()
    assert sorted(c["index"] for c in out["choices"]) == [0, 1, 2, 3] and out["usage"]["completion_tokens"] <= 12
    chunks = stream(server, "/v1/completions", body)
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1, 2, 3}
    chat = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3, "max_tokens": 2}).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1, 2]


def test_chat_logprobs_and_top_logprobs(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 3, "temperature": 0}
    choice = server.post("/v1/chat/completions", body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"]) for c in content)  # greedy
    streamed = [t for c in stream(server, "/v1/chat/completions", body) if c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]


def test_stop_string_spanning_two_tokens_cuts_before_it(server):
    body = {"prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    tokens, text = choice["logprobs"]["tokens"], choice["text"]
    k = next(i for i in range(1, len(tokens) - 1) if tokens[i] and tokens[i + 1] and "\ufffd" not in tokens[i] + tokens[i + 1])
    stop = tokens[k][-1] + tokens[k + 1][0]
    cut = server.post("/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(server):
    body = {"prompt": "import os", "max_tokens": 8, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    alone = server.post("/v1/completions", body).json()["choices"][0]["text"]
    others = [threading.Thread(target=server.post, args=("/v1/completions", {**body, "seed": s})) for s in range(4)]
    for t in others:
        t.start()
    together = server.post("/v1/completions", body).json()["choices"][0]["text"]
    for t in others:
        t.join()
    assert together == alone


def test_metrics_exposes_latencies_engine_state_and_expert_load(server):
    server.post("/v1/completions", {"prompt": "abc", "max_tokens": 3, "ignore_eos": True})
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    values = server.metrics()
    for name in ("moela:time_to_first_token_seconds_count", "moela:inter_token_latency_seconds_count",
                 "moela:e2e_request_latency_seconds_count", "moela:prompt_tokens_total", "moela:generation_tokens_total"):
        assert values[name] > 0, name
    for name in ("moela:num_requests_running", "moela:num_requests_waiting", "moela:kv_cache_usage_perc",
                 "moela:num_preemptions_total", "moela:prefix_cache_hit_rate", "moela:prefix_cache_hits_total"):
        assert name in values, name
    assert 'moela:routed_expert_tokens_total{expert="7",layer="2"}' in text


def test_new_logprobs_ignore_entries_the_engine_appended_after_the_output():
    from moela.engine.outputs import CompletionOutput
    from moela.server.endpoints import all_logprobs, new_logprobs

    live = [{5: -1.0}, {6: -2.0}, {7: -3.0}, {8: -4.0}]  # the engine's list, already one step further
    o = CompletionOutput(0, "", [5, 6, 7], None, live, None, "", [6, 7])
    assert new_logprobs(o) == [{6: -2.0}, {7: -3.0}] and all_logprobs(o) == live[:3]
