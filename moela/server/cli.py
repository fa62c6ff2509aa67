"""`moela serve`: the OpenAI-compatible server, the engine on its own thread in the same process.

    moela serve                                      # the embedded default model on 127.0.0.1:8000
    moela serve ./DeepSeek-V2-Lite-Chat --port 8001 --api-key sk-local --served-model-name v2-lite
    moela serve ./DeepSeek-R1 --reasoning-parser deepseek_r1 --max-num-seqs 32 --max-queued-requests 128
    moela serve ./DeepSeek-V3 --tensor-parallel-size 8 --enable-expert-parallel   # 8 ranks (docs/distributed.md)

The API key may also come from MOELA_API_KEY (so it is not visible in `ps`). The first SIGTERM or
Ctrl-C drains: new requests get 503, running ones have --drain-timeout seconds to finish, the rest
end with finish_reason "abort", then the process exits 0; a second signal exits at once. If the
engine fails, the process exits 1.
"""

import argparse
import asyncio
import logging
import os
import socket
import sys

import uvicorn
from fastapi import FastAPI

from moela.config import RUN_DTYPES, HelpFormatter

from moela.engine.config import add_engine_args
from moela.server.app import REASONING_PARSERS, ServerConfig, build_app
from moela.server.tools import FORMATS
from moela.server.worker import EngineWorker

log = logging.getLogger(__name__)


def port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (0-65535; 0 picks a free one)")
    return int(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moela serve", description="OpenAI-compatible server (/v1/completions, "
                                "/v1/chat/completions, /v1/models, /health, /metrics).",
                                formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--model", dest="model_flag", default=None, help="the same, as a flag")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    p.add_argument("--port", type=port, default=8000, help="TCP port")
    p.add_argument("--api-key", default=os.environ.get("MOELA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: the MOELA_API_KEY environment variable, if set)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model directory as given, or moela-default)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-queued-requests", type=int, default=256, help="requests waiting beyond those (then 503)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length served (default and upper bound: the model's max_position_embeddings)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 4GiB (default: max-num-seqs full "
                   "contexts, at most a quarter of memory)")
    p.add_argument("--dtype", choices=RUN_DTYPES, default="auto",
                   help="weight and cache dtype; auto: bfloat16 where the device computes in it natively, else float32")
    add_engine_args(p)
    p.add_argument("--cors-origins", nargs="*", default=[], help="origins allowed by CORS (none by default)")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="put <think>...</think> into reasoning_content")
    p.add_argument("--tool-call-parser", choices=tuple(FORMATS), default=None,
                   help="DeepSeek tool-call format of the model (default: from its model_type and chat template)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's flag, accepted so its command lines work: tool calls are parsed whenever a request has tools")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="larger request bodies get 413")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get after SIGTERM")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="debug adds uvicorn's access log")
    args = p.parse_args(argv)
    if args.model and args.model_flag and args.model != args.model_flag:
        p.error(f"two models given: {args.model!r} and --model {args.model_flag!r}")
    args.model = args.model or args.model_flag
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if follows(args):
            return 0
        worker, app = build(args)
        sock = listen(args.host, args.port)  # fails here, before the model loads, if the port is taken
    except (ValueError, OSError) as e:  # MoelaError included: a bad model directory or option
        print(f"error: {e}", file=sys.stderr)
        return 1
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    log.info("loading %s; /health answers 503 until it is ready", args.model or "the embedded default model")
    worker.on_ready = lambda: log.info("ready: serving %r on %s", served_name(args), url)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
    logging.getLogger("uvicorn.error").addFilter(lambda record: "Uvicorn running on" not in record.getMessage())
    server = DrainingServer(config, worker, args.drain_timeout)
    server.run(sockets=[sock])
    return 1 if worker.state == "dead" else 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, with the reason in the error when that is not possible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def engine_config(args: argparse.Namespace):
    from moela.config import model_dir
    from moela.engine.config import EngineConfig, engine_args

    return EngineConfig(model=model_dir(args.model), dtype=args.dtype, max_model_len=args.max_model_len,
                        kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs, **engine_args(args))


def follows(args: argparse.Namespace) -> bool:
    """Under torchrun, ranks > 0 run rank 0's steps instead of serving (until rank 0 stops): True when done."""
    from moela.engine.ranks import follow_forever, is_follower

    cfg = engine_config(args)
    if not is_follower(cfg):
        return False
    follow_forever(cfg)
    return True


def build(args: argparse.Namespace) -> tuple[EngineWorker, FastAPI]:
    """The worker (whose thread will load the model) and the app; the config is checked here, up front."""
    import torch

    from moela import ops
    from moela.config import ModelConfig
    from moela.engine.llm import LLMEngine
    from moela.engine.onnx_runner import read_manifest

    engine_cfg = engine_config(args)
    engine_cfg.check_model(ModelConfig.from_pretrained(engine_cfg.model))  # an unsupported model fails before the server starts
    if engine_cfg.runtime == "torch":
        ops.select(engine_cfg.backend, torch.device(engine_cfg.device), engine_cfg.torch_dtype)  # so does a backend
    else:
        read_manifest(engine_cfg.model)  # and a directory that is no export
    if args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests = {args.max_queued_requests} is invalid: must be >= 0")
    cfg = ServerConfig(model_name=served_name(args), api_key=args.api_key,
                       cors_origins=args.cors_origins, reasoning_parser=args.reasoning_parser,
                       max_body_bytes=args.max_body_bytes, tool_call_parser=args.tool_call_parser)
    worker = EngineWorker(lambda: LLMEngine(engine_cfg), capacity=args.max_num_seqs + args.max_queued_requests)
    return worker, build_app(worker, cfg)


def served_name(args: argparse.Namespace) -> str:
    return args.served_model_name or args.model or "moela-default"


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
