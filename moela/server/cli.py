"""`moela serve`: the OpenAI-compatible server, the engine on its own thread in the same process.

    moela serve                                      # the embedded default model on 127.0.0.1:8000
    moela serve ./DeepSeek-V2-Lite-Chat --port 8001 --api-key sk-local --served-model-name v2-lite
    moela serve ./DeepSeek-R1 --reasoning-parser deepseek_r1 --max-num-seqs 32 --max-queued-requests 128

The API key may also come from MOELA_API_KEY (so it is not visible in `ps`). The first SIGTERM or
Ctrl-C drains: new requests get 503, running ones have --drain-timeout seconds to finish, the rest
end with finish_reason "abort", then the process exits 0; a second signal exits at once. If the
engine fails, the process exits 1.
"""

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from moela.config import DTYPES, add_engine_args
from moela.server.app import REASONING_PARSERS, ServerConfig, build_app
from moela.server.worker import EngineWorker

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moela serve", description="OpenAI-compatible server (/v1/completions, "
                                "/v1/chat/completions, /v1/models, /health, /metrics).")
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MOELA_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-queued-requests", type=int, default=256, help="requests waiting beyond those (then 503)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 4GiB (default: from max-num-seqs)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    add_engine_args(p)
    p.add_argument("--cors-origins", nargs="*", default=[], help="origins allowed by CORS (default: none)")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="put <think>...</think> into reasoning_content")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="larger request bodies get 413")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get after SIGTERM")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker, app = build(args)
    except ValueError as e:  # MoelaError included: a bad model directory or option
        print(f"error: {e}", file=sys.stderr)
        return 1
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                            access_log=args.log_level == "debug")
    server = DrainingServer(config, worker, args.drain_timeout)
    server.run()
    return 1 if worker.state == "dead" else 0


def build(args: argparse.Namespace) -> tuple[EngineWorker, FastAPI]:
    """The worker (whose thread will load the model) and the app; the config is checked here, up front."""
    from moela.config import DEFAULT_MODEL_DIR, EngineConfig, ModelConfig
    from moela.engine.llm import LLMEngine

    path = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if not path.is_dir():
        raise ValueError(f"{path}: no such model directory")
    ModelConfig.from_pretrained(path)  # an unsupported model fails before the server starts
    engine_cfg = EngineConfig(model=path, dtype=args.dtype, device=args.device, backend=args.backend, max_model_len=args.max_model_len,
                              kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs)
    if args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests = {args.max_queued_requests} is invalid: must be >= 0")
    cfg = ServerConfig(model_name=args.served_model_name or args.model or "moela-default", api_key=args.api_key,
                       cors_origins=args.cors_origins, reasoning_parser=args.reasoning_parser,
                       max_body_bytes=args.max_body_bytes)
    worker = EngineWorker(lambda: LLMEngine(engine_cfg), capacity=args.max_num_seqs + args.max_queued_requests)
    return worker, build_app(worker, cfg)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first exit signal drains the engine instead of dropping connections."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, drain_timeout: float):
        super().__init__(config)
        self.worker, self.drain_timeout, self.draining = worker, drain_timeout, False
        worker.on_dead = self.exit

    def exit(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        if self.draining or self.worker.loop is None or self.worker.state != "ready":
            return super().handle_exit(sig, frame)
        self.draining = True
        self.worker.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        worker, loop = self.worker, asyncio.get_running_loop()
        worker.state = "draining"
        log.info("draining: %d requests in flight, %.0fs to finish", worker.in_flight, self.drain_timeout)
        deadline = loop.time() + self.drain_timeout
        while worker.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        worker.abort_all()
        for _ in range(40):  # up to 2s for the aborted ones to send their last chunk
            if not worker.in_flight:
                break
            await asyncio.sleep(0.05)
        self.exit()
