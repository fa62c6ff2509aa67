"""RequestGate: the ASGI middleware every request passes before any route runs.

    app.add_middleware(RequestGate, api_key="sk-...", max_body_bytes=8 * 2**20)

In order: the API key (every route but /health; `Authorization: Bearer KEY`, compared in constant
time) -> 401; a request body that is not JSON -> 415; a body over the limit -> 413, decided from
Content-Length or while reading, so at most `max_body_bytes` are ever held. The body read here is
replayed to the app, whose later `receive()` calls still report a client disconnect.
"""

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moela.server.protocol import ApiError

OPEN_PATHS = ("/health",)


class RequestGate:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            error = ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                             type="authentication_error", code="invalid_api_key")
            return await _reply(error, scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            return await _reply(ApiError(415, f"Content-Type {content_type!r} is not supported: send application/json"),
                                scope, receive, send)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await _reply(self._too_large(), scope, receive, send)
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            return await _reply(self._too_large(), scope, receive, send)
        return await self.app(scope, _replay(body, receive), send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.api_key)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body exceeds {self.max_body_bytes} bytes", code="request_too_large")


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` (or the client leaves)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _reply(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)
