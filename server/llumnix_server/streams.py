"""Helpers shared by the OpenAI and KServe front ends for running a request's output streams."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import Request

from llumnix_backend.requests import GenerationDelta, RequestError

T = TypeVar("T")
logger = logging.getLogger(__name__)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


MAX_CLIENT_ID_CHARS = 256


def client_request_ids(prefix: str, request: Request, given: str | None) -> tuple[str, str]:
    """The id an OpenAI-style response shows, and the one its engine requests are keyed by. As
    vLLM's server: `prefix-ID`, ID the `X-Request-Id` header, else the body's `request_id`, else
    a random one. A client's ID is shown as given; the engine's key gets a random suffix, since
    two requests in flight may carry the same ID (they are kept apart)."""
    chosen = request.headers.get("x-request-id") or given
    if not chosen:
        generated = new_request_id(prefix)
        return generated, generated
    if len(chosen) > MAX_CLIENT_ID_CHARS:
        raise RequestError(f"the request id is longer than {MAX_CLIENT_ID_CHARS} characters", "request_id")
    shown = f"{prefix}-{chosen}"
    return shown, f"{shown}-{uuid.uuid4().hex[:12]}"


def log_ignored_fields(route: str, extra: Mapping[str, Any] | None, read: Collection[str]) -> None:
    """Warn, as vLLM's server does, of a request's fields that nothing reads (`extra`: those
    its model does not declare; `read`: the ones among them the route looks at)."""
    ignored = sorted(set(extra or ()) - set(read))
    if ignored:
        logger.warning("%s: the request's fields %s were ignored", route, ", ".join(ignored))


def refuse_unsupported_fields(extra: Mapping[str, Any] | None, unsupported: Mapping[str, tuple]) -> None:
    """A 400 naming the first of a request's undeclared fields that this server lacks and that
    it sets to something other than the values that ask for nothing (`unsupported`)."""
    for name, value in (extra or {}).items():
        if name in unsupported and value not in unsupported[name]:
            raise RequestError(f"{name} is not supported by this server", name)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request | None, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away first (the request is then aborted).
    Without an HTTP request (gRPC), the caller's own cancellation does that."""
    if request is None:
        return await work
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((work_task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work_task.done():
        work_task.cancel()
        raise asyncio.CancelledError("client disconnected")
    return work_task.result()


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


async def started(request: Request | None, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the stream's first item, so dispatch and validation errors surface as a proper
    HTTP error before a 200 is sent; returns an iterator that still yields every item."""
    try:
        first = await unless_disconnected(request, stream.__anext__())
    except BaseException:
        await stream.aclose()
        raise
    return _prepend(first, stream)


async def merge_indexed(streams: Sequence[AsyncIterator[GenerationDelta]]) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """Interleave several choices' streams as (choice index, delta), in arrival order."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, GenerationDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationDelta]) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
            await queue.put((index, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
