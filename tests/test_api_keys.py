"""Which key opens which route (`ApiKeyMiddleware`), over an app whose routes only echo."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from llumnix_server.app import ApiKeyMiddleware

ROUTES = {
    "client": ["/v1/completions", "/v2/models/m/generate", "/v2/llumnix/models/m/instances"],
    "operations": ["/v2/llumnix/models/m/migrate", "/v2/llumnix/models/m/instances/0/drain",
                   "/v2/llumnix/models/m/instances/0/resume", "/v2/repository/models/m/load",
                   "/v2/repository/models/m/unload"],
    "open": ["/v2/health/live", "/metrics"],
}


def app(api_key: str | None, operations_key: str | None) -> FastAPI:
    inner = FastAPI()

    @inner.post("/{path:path}")
    async def echo(path: str) -> dict:
        return {"path": path}

    inner.add_middleware(ApiKeyMiddleware, api_key=api_key, operations_key=operations_key)
    return inner


def statuses(api_key: str | None, operations_key: str | None, key: str | None) -> dict[str, set[int]]:
    async def run() -> dict[str, set[int]]:
        transport = httpx.ASGITransport(app=app(api_key, operations_key))
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return {kind: {(await client.post(path, headers=headers)).status_code for path in paths}
                    for kind, paths in ROUTES.items()}
    return asyncio.run(run())


@pytest.mark.parametrize(
    ("key", "client", "operations"),
    [("client-key", 200, 401), ("ops-key", 200, 200), (None, 401, 401), ("wrong", 401, 401)],
)
def test_with_an_operations_key_only_it_opens_the_operations_routes(key, client, operations) -> None:
    seen = statuses("client-key", "ops-key", key)
    assert seen == {"client": {client}, "operations": {operations}, "open": {200}}


def test_without_an_operations_key_the_api_key_opens_everything() -> None:
    assert statuses("client-key", None, "client-key") == {"client": {200}, "operations": {200}, "open": {200}}
    assert statuses("client-key", None, None) == {"client": {401}, "operations": {401}, "open": {200}}


def test_an_operations_key_alone_leaves_the_client_routes_open() -> None:
    assert statuses(None, "ops-key", None) == {"client": {200}, "operations": {401}, "open": {200}}


def test_a_refusal_names_the_key_the_route_needs() -> None:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app("client-key", "ops-key"))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v2/llumnix/models/m/migrate", headers={"Authorization": "Bearer client-key"})
    response = asyncio.run(run())
    assert response.status_code == 401 and "operations key" in response.json()["error"]
    assert response.headers["www-authenticate"] == "Bearer"
