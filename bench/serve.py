"""Load benchmark for `moela serve`: a fixed number of streaming requests with Poisson arrivals, on loopback.

    python bench/serve.py                                        # starts `moela serve` on the default model
    python bench/serve.py --model DIR --num-requests 200 --rate 8 --prompt-len 128 --max-tokens 64
    python bench/serve.py --url http://127.0.0.1:8000 --model DIR   # a server already running (DIR for the vocab)

Every request streams POST /v1/completions with random prompt token ids and ignore_eos, so each one
generates exactly --max-tokens tokens. Reported, as p50/p99/mean: TTFT (request sent -> first token),
TPOT ((end - first token) / (tokens - 1)), inter-token latency (gaps between streamed tokens), end-to-end
latency; and request and output-token throughput over the whole run. Unless --url is given, the server
is started as its own process (the client must not share its GIL) and stopped with SIGTERM at the end.
Writes bench/results/serve-<date>.json with the machine, date and command.
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "moela" / "assets" / "default-model"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory (served, and read for its vocab size)")
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32, help="passed to the server it starts")
    p.add_argument("--dtype", default="bfloat16", help="passed to the server it starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results file (default: bench/results/serve-<date>.json)")
    return p.parse_args()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moela.cli", "serve", args.model, "--port", str(port), "--dtype", args.dtype,
           "--max-num-seqs", str(args.max_num_seqs), "--served-model-name", "bench", "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to 5 minutes to load
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not become ready in 5 minutes")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, token_times, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                token_times.append(time.perf_counter())
    return {"start": start, "token_times": token_times, "end": time.perf_counter(), "tokens": tokens}


async def run_load(args: argparse.Namespace, url: str, vocab: int) -> tuple[list[dict], float]:
    rng = random.Random(args.seed)
    arrivals, t = [], 0.0
    for _ in range(args.num_requests):
        t += rng.expovariate(args.rate)
        arrivals.append(t)
    prompts = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    limits = httpx.Limits(max_connections=args.num_requests, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        begin = time.perf_counter()

        async def at(delay: float, prompt: list[int]) -> dict:
            await asyncio.sleep(delay)
            return await one_request(client, url, prompt, args.max_tokens)

        results = await asyncio.gather(*(at(d, p) for d, p in zip(arrivals, prompts)))
    return results, time.perf_counter() - begin


def summarize(results: list[dict], duration: float) -> dict:
    def stats(values: list[float]) -> dict[str, float]:
        a = np.asarray(values) * 1000
        return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}

    ttft = [r["token_times"][0] - r["start"] for r in results]
    tpot = [(r["end"] - r["token_times"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    itl = [b - a for r in results for a, b in zip(r["token_times"], r["token_times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "duration_s": duration, "request_throughput_per_s": len(results) / duration,
            "output_token_throughput_per_s": tokens / duration, "output_tokens": tokens,
            "ttft": stats(ttft), "tpot": stats(tpot), "itl": stats(itl),
            "e2e": stats([r["end"] - r["start"] for r in results])}


def main() -> int:
    args = parse_args()
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    load = os.getloadavg()[0]  # other work on the machine skews every number below
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        results, duration = asyncio.run(run_load(args, url, vocab))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    summary = summarize(results, duration)
    record = {"command": " ".join(["python", "bench/serve.py", *sys.argv[1:]]),
              "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} CPUs, {platform.system()}",
              "load_average_1min_at_start": load,
              "model": args.model, "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": summary}
    out = Path(args.out or Path(__file__).parent / "results" / f"serve-{record['date']}.json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
