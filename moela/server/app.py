"""The OpenAI-compatible FastAPI app: routes, error bodies, and the engine worker's lifetime.

    worker = EngineWorker(lambda: LLMEngine(engine_cfg), capacity=max_num_seqs + max_queued_requests)
    app = build_app(worker, ServerConfig(model_name="my-model", api_key="sk-..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # `moela serve` does this (moela/server/cli.py)

Routes: GET /health (503 until a warm-up forward has run), GET /metrics (Prometheus), GET
/v1/models and /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions. Every error is OpenAI's body
`{"error": {"message", "type", "param", "code"}}`; a body that fails validation is a 400 naming the
field (never FastAPI's 422).
"""

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from moela.server.chat import create_chat_completion
from moela.server.completions import create_completion
from moela.server.endpoints import Serving, as_api_error
from moela.server.metrics import CONTENT_TYPE
from moela.server.middleware import RequestGate
from moela.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from moela.server.tools import FORMATS
from moela.server.worker import EngineWorker, WorkerError

log = logging.getLogger(__name__)
REASONING_PARSERS = ("deepseek_r1",)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    reasoning_parser: str | None = None
    max_body_bytes: int = 8 * 2**20
    tool_call_parser: str | None = None  # None: the format the model's type and chat template use

    def __post_init__(self) -> None:
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser = {self.reasoning_parser!r} is invalid: "
                             f"must be one of {REASONING_PARSERS}")
        if self.tool_call_parser not in (None, *FORMATS):
            raise ValueError(f"tool_call_parser = {self.tool_call_parser!r} is invalid: must be one of {tuple(FORMATS)}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty")


def build_app(worker: EngineWorker, cfg: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start(asyncio.get_running_loop())
        yield
        worker.stop()

    app = FastAPI(title="moela", summary="OpenAI-compatible server for DeepSeek-family models", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    _add_routes(app, worker, Serving(worker, cfg.model_name, cfg.reasoning_parser == "deepseek_r1", cfg.tool_call_parser))
    app.add_middleware(RequestGate, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    if cfg.cors_origins:  # outermost, so preflights are answered before the API key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    return app


def _add_routes(app: FastAPI, worker: EngineWorker, serving: Serving) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": worker.state}, status_code=200 if worker.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE)

    def card() -> dict:
        return {"id": serving.model_name, "object": "model", "created": int(time.time()), "owned_by": "moela",
                "max_model_len": worker.engine.max_model_len if worker.engine else None}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        serving.check_model(model_id)
        return JSONResponse(card())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, serving)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, serving)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await api_error(request, ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(WorkerError)
    async def worker_error(request: Request, e: WorkerError) -> JSONResponse:
        return await api_error(request, as_api_error(e))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")  # the connection is closed after this answer: say so
        error = ApiError(500, f"internal error: {type(e).__name__}", type="server_error", headers={"Connection": "close"})
        return await api_error(request, error)


def validation_error(e: RequestValidationError) -> ApiError:
    """The first problem, as a 400 naming the field (`messages.0.role`) when there is one."""
    error = e.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}")
    if not loc:
        return ApiError(400, f"the body must be a JSON object ({error.get('msg')})")
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ApiError(400, f"{'.'.join(loc)}: {error.get('msg')} (got {shown})", param=loc[0])
