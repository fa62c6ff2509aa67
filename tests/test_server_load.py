"""Concurrency and disconnects: 50 streams of which 20 hang up, clients that time out all at once,
and afterwards no running request and no KV block left in use."""

import asyncio
import json
import random
import time

import httpx
import pytest

from test_server import ThreadServer, tiny_model, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    srv = ThreadServer(path, max_num_seqs=64, max_model_len=512).start()
    yield srv
    srv.stop()


def assert_idle_within(server: ThreadServer, seconds: float) -> None:
    def idle() -> bool:
        m = server.metrics()
        return m["moela:num_requests_running"] == 0 and m["moela:num_requests_waiting"] == 0 \
            and m["moela:kv_cache_usage_perc"] == 0
    wait_for(idle, seconds, "running = 0 and KV usage = 0")


async def one_stream(client: httpx.AsyncClient, server: ThreadServer, i: int, leave_after: int | None) -> str:
    """The finish_reason of a streamed chat completion, or 'left' if this client hung up after `leave_after` events."""
    chat = i % 2 == 0
    body = {"max_tokens": 12, "ignore_eos": True, "temperature": 1.0, "seed": i, "stream": True,
            **({"messages": [{"role": "user", "content": f"request {i}"}], "logprobs": True, "top_logprobs": 2} if chat
               else {"prompt": [5 + i] * (1 + 2 * i), "logprobs": 2})}
    route = "/v1/chat/completions" if chat else "/v1/completions"
    finish, done, logprobs = None, 0, 0
    async with client.stream("POST", server.url + route, json=body, headers=server.headers) as r:
        assert r.status_code == 200
        events = 0
        async for line in r.aiter_lines():
            if leave_after is not None and events >= leave_after:
                return "left"  # leaving the block closes the connection mid-stream
            if not line.startswith("data: "):
                continue
            events += 1
            if line == "data: [DONE]":
                done += 1
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            finish = choice["finish_reason"] or finish
            lp = choice["logprobs"] or {}
            logprobs += len(lp.get("content") or lp.get("tokens") or [])
    assert done == 1 and logprobs == 12  # one entry per token, each for its own token
    return finish


def test_50_concurrent_streams_with_20_disconnects_free_everything(server):
    rng = random.Random(0)
    leavers = {i: rng.randrange(0, 6) for i in rng.sample(range(50), 20)}  # 0: before the first token (prefill)

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one_stream(client, server, i, leavers.get(i)) for i in range(50)))

    results = asyncio.run(main())
    assert [r for i, r in enumerate(results) if i not in leavers] == ["length"] * 30
    assert all(results[i] == "left" for i in leavers)
    assert_idle_within(server, 1.0)


def test_clients_timing_out_at_once_are_aborted_and_the_next_request_is_served(server):
    async def impatient(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"slow {i}", "max_tokens": 500, "ignore_eos": True}  # seconds of decoding, even alone
        with pytest.raises(httpx.TimeoutException):
            await client.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=0.3)

    async def main() -> None:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=60, max_keepalive_connections=0)) as client:
            await asyncio.gather(*(impatient(client, i) for i in range(40)))

    before = server.metrics()["moela:generation_tokens_total"]
    asyncio.run(main())
    assert_idle_within(server, 5.0)  # the engine finishes the prefill step it was in, then drops them all
    assert server.metrics()["moela:generation_tokens_total"] - before < 40 * 500 / 4  # aborted, not decoded to the end
    start = time.monotonic()
    r = server.post("/v1/completions", {"prompt": "next", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and time.monotonic() - start < 2.0


def rss_mib() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


def test_soak_with_random_cancels_keeps_memory_and_blocks_flat(server):
    """Rounds of streams, a third of them cancelled: nothing is left behind, and RSS stops growing."""
    async def round_(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            await asyncio.gather(*(one_stream(client, server, i, rng.randrange(0, 8) if rng.random() < 0.35 else None)
                                   for i in range(30)))

    rss = []
    for seed in range(3):
        asyncio.run(round_(seed))
        assert_idle_within(server, 1.0)
        engine = server.worker.engine
        assert not server.worker.tracks and server.worker.in_flight == 0 and not engine.requests
        assert engine.blocks.num_free == engine.blocks.num_blocks
        rss.append(rss_mib())
    assert rss[-1] - rss[0] < 25, rss
