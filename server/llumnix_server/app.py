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
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llumnix_backend.model_registry import ModelRegistry
from llumnix_server.errors import install_error_handlers
from llumnix_server.kserve_api import create_kserve_router
from llumnix_server.llumnix_api import create_llumnix_router
from llumnix_server.openai_api import create_openai_router

logger = logging.getLogger(__name__)

UNAUTHENTICATED_PREFIXES = ("/v2/health/", "/metrics")


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every route but health and metrics."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNAUTHENTICATED_PREFIXES):
            return await self._app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            return await self._app(scope, receive, send)
        openai_route = scope["path"].startswith("/v1/")
        body = (
            b'{"error":{"message":"invalid or missing API key","type":"AuthenticationError","param":null,"code":401}}'
            if openai_route else b'{"error":"invalid or missing API key"}'
        )
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": body})


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
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            await registry.load_repository()
            freeze_loaded_heap()
            if on_loaded is not None:
                on_loaded(registry)

        loading = asyncio.create_task(load(), name="load-repository")
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loading
            await registry.shutdown()

    app = FastAPI(title="Llumnix Backend", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(create_openai_router(registry))
    app.include_router(create_kserve_router(registry))
    app.include_router(create_llumnix_router(registry))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(registry.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
