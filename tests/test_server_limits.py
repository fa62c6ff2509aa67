"""Limits and failures: a full queue (503 + Retry-After), a request larger than the KV cache, preemption,
CORS, /health while loading, one request failing alone, and the engine dying."""

import json
import threading

import httpx
import pytest

from moela.engine.config import EngineConfig
from moela.engine.llm import LLMEngine
from test_server import MODEL_LEN, ThreadServer, sse_events, tiny_model, wait_for

CACHE_TOKENS = 64  # 4 blocks of 16
BYTES_PER_TOKEN = (24 + 8) * 3 * 4  # (kv_lora_rank + qk_rope_head_dim) x layers x fp32


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two sequences at a time, one more queued, a 64-token KV cache."""
    path, _ = tiny_model(tmp_path_factory)
    srv = ThreadServer(path, max_num_seqs=2, max_queued_requests=1, kv_cache_memory=CACHE_TOKENS * BYTES_PER_TOKEN,
                       cors_origins=("http://ok.example",)).start()
    yield srv
    srv.stop()


def test_full_queue_is_503_with_retry_after_before_any_stream_byte(small):
    body = {"prompt": [5, 6, 7], "max_tokens": 55, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=small.headers) as client:
        streams = [client.stream("POST", f"{small.url}/v1/completions", json=body) for _ in range(3)]
        responses = [s.__enter__() for s in streams]  # headers arrive once the engine accepted each one
        assert all(r.status_code == 200 for r in responses)
        full = httpx.post(f"{small.url}/v1/completions", json=body, headers=small.headers)
        assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["code"] == "queue_full" and not full.text.startswith("data:")
        for s in streams:
            s.__exit__(None, None, None)
    wait_for(lambda: small.worker.in_flight == 0, 5, "the slots to be released")
    assert small.post("/v1/completions", {**body, "stream": False, "max_tokens": 2}).status_code == 200


def test_request_larger_than_the_whole_kv_cache_is_400_and_the_default_fits(small):
    r = small.post("/v1/completions", {"prompt": [5] * 10, "max_tokens": 100})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "110" in message and str(CACHE_TOKENS) in message  # prompt + max_tokens, cache
    out = small.post("/v1/completions", {"prompt": [5] * 10, "ignore_eos": True}).json()  # no max_tokens: what fits
    assert out["usage"]["completion_tokens"] == CACHE_TOKENS - 10 < MODEL_LEN - 10


def test_kv_exhaustion_preempts_and_greedy_output_is_unchanged(small):
    prompts = [[9 + i] * 10 for i in range(2)]
    body = {"max_tokens": 30, "ignore_eos": True, "temperature": 0}
    alone = [small.post("/v1/completions", {**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]
    before = small.metrics()["moela:num_preemptions_total"]
    together = small.post("/v1/completions", {**body, "prompt": prompts}).json()["choices"]  # admitted at once
    assert [c["text"] for c in sorted(together, key=lambda c: c["index"])] == alone
    assert small.metrics()["moela:num_preemptions_total"] > before  # 2 x 40 tokens > 64: one was recomputed


def test_cors_answers_only_configured_origins(small):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(f"{small.url}/v1/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})

    ok, evil = preflight("http://ok.example"), preflight("http://evil.example")
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ok.example"
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    simple = httpx.get(f"{small.url}/v1/models", headers={**small.headers, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_health_is_503_while_loading_and_200_after_a_warm_up_forward(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    gate = threading.Event()
    cfg = EngineConfig(model=path, dtype="float32", max_model_len=MODEL_LEN)

    def slow_build() -> LLMEngine:
        assert gate.wait(30)
        return LLMEngine(cfg)

    srv = ThreadServer(path, build=slow_build).start(wait_ready=False)
    try:
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        early = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert early.status_code == 503 and "Retry-After" in early.headers
        gate.set()
        wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, 30, "/health 200")
        assert srv.metrics()["moela:generation_tokens_total"] >= 1  # the warm-up forward ran before 200
    finally:
        gate.set()
        srv.stop()


def test_one_failing_request_fails_alone(tmp_path_factory, monkeypatch):
    import moela.server.chat as chat

    path, _ = tiny_model(tmp_path_factory)
    srv = ThreadServer(path).start()
    real_chunk = chat._chunk

    def chunk(req, serving, o, splitter):
        if req.user == "boom":
            raise RuntimeError("boom")
        return real_chunk(req, serving, o, splitter)

    monkeypatch.setattr(chat, "_chunk", chunk)
    real_add = srv.worker.engine.add_request
    monkeypatch.setattr(srv.worker.engine, "add_request", lambda prompt, params, rid:
                        (_ for _ in ()).throw(RuntimeError("bad")) if prompt == [7, 7, 7] else real_add(prompt, params, rid))
    try:
        chat_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True, "stream": True}
        results: dict[str, object] = {}
        jobs = {"boom": lambda: srv.post("/v1/chat/completions", {**chat_body, "user": "boom"}),
                "fine": lambda: srv.post("/v1/chat/completions", {**chat_body, "user": "fine"}),
                "bad": lambda: srv.post("/v1/completions", {"prompt": [7, 7, 7], "max_tokens": 2}),
                "good": lambda: srv.post("/v1/completions", {"prompt": [7, 7, 8], "max_tokens": 2})}
        threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f())) for k, f in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        boom = [json.loads(e) for e in sse_events(results["boom"])]
        assert boom[0]["choices"][0]["delta"]["role"] == "assistant" and boom[-1]["error"]["type"] == "server_error"
        fine = [json.loads(e) for e in sse_events(results["fine"])]
        assert fine[-1]["choices"][0]["finish_reason"] == "length"
        assert results["bad"].status_code == 500 and results["bad"].json()["error"]["type"] == "server_error"
        assert results["good"].status_code == 200
        wait_for(lambda: srv.worker.in_flight == 0 and not srv.worker.tracks, 5, "every request to be released")
    finally:
        srv.stop()


def test_engine_death_fails_requests_sets_health_503_and_stops_the_server(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    srv = ThreadServer(path).start()
    try:
        def die():
            raise RuntimeError("device lost")

        srv.worker.engine.step = die
        r = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
        events = [json.loads(e) for e in sse_events(r)]
        assert "device lost" in events[-1]["error"]["message"]
        assert srv.worker.state == "dead"
        srv.thread.join(10)
        assert not srv.thread.is_alive()  # on_dead asked uvicorn to exit; `moela serve` then returns 1
    finally:
        srv.stop()
