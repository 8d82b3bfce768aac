"""The HTTP application: one endpoint for every model of the repository.

The server answers as soon as it starts (liveness, repository index, metrics) while the
models load in the background; `/v2/health/ready` turns 200 once loading has finished and at
least one model serves (or there was nothing to load).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llumnix_backend.model_registry import ModelRegistry
from llumnix_server.errors import OPENAI_ERROR_TYPES, install_error_handlers
from llumnix_server.embeddings_api import create_embeddings_router
from llumnix_server.kserve_api import create_kserve_router
from llumnix_server.llumnix_api import create_llumnix_router
from llumnix_server.openai_api import create_openai_router
from llumnix_server.vllm_routes import create_vllm_router

logger = logging.getLogger(__name__)

DEFAULT_GRPC_MESSAGE_BYTES = 4 << 20
GRPC_STOP_GRACE_S = 1.0
UNAUTHENTICATED_PREFIXES = ("/v2/health/", "/metrics")
UNAUTHENTICATED_PATHS = frozenset({"/health", "/ping", "/version"})  # vLLM's, open there too


# Routes that move or unload work: with an operations key, only that key opens them.
OPERATIONS_ROUTE = re.compile(
    r"^/v2/llumnix/models/[^/]+/(migrate|instances/[^/]+/(drain|resume))$|^/v2/repository/models/.+/(load|unload)$")


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every route but health and metrics: the API
    key, or the operations key, which alone opens the operations routes (migrate, drain,
    resume, load, unload) when it is set, so that a client's key cannot move or unload models."""

    def __init__(self, app: ASGIApp, api_key: str | None, operations_key: str | None = None) -> None:
        self._app = app
        self._client = f"Bearer {api_key}".encode() if api_key else None
        self._operator = f"Bearer {operations_key}".encode() if operations_key else None

    def _allowed(self, path: str, given: bytes) -> bool:
        if self._operator is not None and hmac.compare_digest(given, self._operator):
            return True
        if self._operator is not None and OPERATIONS_ROUTE.match(path):
            return False
        return self._client is None or hmac.compare_digest(given, self._client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"].startswith(UNAUTHENTICATED_PREFIXES)
                or scope["path"] in UNAUTHENTICATED_PATHS):
            return await self._app(scope, receive, send)
        if self._allowed(scope["path"], dict(scope["headers"]).get(b"authorization", b"")):
            return await self._app(scope, receive, send)
        needed = "the operations key" if self._operator and OPERATIONS_ROUTE.match(scope["path"]) else "an API key"
        await _send_error(send, scope["path"], 401, f"invalid or missing API key: this route needs {needed}",
                          [(b"www-authenticate", b"Bearer")])


async def _send_error(send: Send, path: str, status: int, message: str, extra_headers: list | None = None) -> None:
    """An error response from a middleware, in the shape the route's API uses."""
    kind = OPENAI_ERROR_TYPES.get(status, HTTPStatus(status).phrase)
    payload = ({"error": {"message": message, "type": kind, "param": None, "code": status}}
               if path.startswith("/v1/") else {"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Refuses (413) a request body larger than `max_bytes`, by its Content-Length before
    reading it, or once that many bytes of a chunked body have arrived: no body that large
    is parsed or tokenised."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        message = f"the request body is larger than this server's limit of {self._max} bytes (--max-request-bytes)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max:
            return await _send_error(send, scope["path"], 413, message)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self._max:
                raise _BodyTooLarge
            return event

        async def watched_send(event) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self._app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, scope["path"], 413, message)


def freeze_loaded_heap() -> None:
    """Move everything loading created (modules, tokenizers, engine clients) out of the
    garbage collector's sight: full collections then scan only per-request objects and stay
    short, instead of pausing every stream for hundreds of milliseconds (as vLLM's own server
    does after start-up). No collection first: over this heap it would itself stall every
    request already being served for seconds."""
    began = time.perf_counter()
    gc.freeze()
    logger.debug("froze %d objects in %.3f s", gc.get_freeze_count(), time.perf_counter() - began)


def create_app(
    registry: ModelRegistry,
    api_key: str | None = None,
    on_loaded: Callable[[ModelRegistry], None] | None = None,
    max_request_bytes: int | None = None,
    operations_key: str | None = None,
    grpc_address: tuple[str, int] | None = None,
) -> FastAPI:
    """The HTTP application; with `grpc_address` (host, port), KServe's gRPC service runs beside
    it in the same event loop (`kserve_grpc`)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            await registry.load_repository()
            freeze_loaded_heap()
            if on_loaded is not None:
                on_loaded(registry)

        grpc_server = None
        if grpc_address is not None:
            try:
                from llumnix_server.kserve_grpc import create_grpc_server
            except ImportError as exc:  # an install without the project's dependencies (--no-deps)
                logger.error("KServe gRPC is off: %s (it needs grpcio and tritonclient[grpc]); HTTP serves", exc)
            else:
                grpc_server = create_grpc_server(registry, *grpc_address, api_key=api_key,
                                                 operations_key=operations_key,
                                                 max_request_bytes=max_request_bytes or DEFAULT_GRPC_MESSAGE_BYTES)
                await grpc_server.start()
        loading = asyncio.create_task(load(), name="load-repository")
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loading
            if grpc_server is not None:  # its streams ended with the registry's grace period
                await grpc_server.stop(GRPC_STOP_GRACE_S)
            await registry.shutdown()

    app = FastAPI(title="Llumnix Backend", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(create_openai_router(registry))
    app.include_router(create_embeddings_router(registry))
    app.include_router(create_kserve_router(registry))
    app.include_router(create_llumnix_router(registry))
    app.include_router(create_vllm_router(registry))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(registry.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if max_request_bytes is not None:
        app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    if api_key or operations_key:  # added last: it runs first, so no unauthenticated body is read
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, operations_key=operations_key)
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server, calling `on_stop` as soon as a stop signal arrives (uvicorn itself
    only stops accepting connections and waits for the open ones, up to its
    `timeout_graceful_shutdown`): the registry then refuses new requests and ends the running
    ones after the grace period."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_stop)  # from a signal handler, not inside the loop
        super().handle_exit(sig, frame)
