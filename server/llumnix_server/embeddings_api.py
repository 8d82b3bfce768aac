"""OpenAI's /v1/embeddings, as vLLM's server serves it for a model whose engine runs a pooling
task (`engine.runner: pooling`). Each input is its own engine request, dispatched to the model's
instances as generations are; the embeddings come back in the order of the inputs."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from llumnix_backend.config import PrioritySettings
from llumnix_backend.model_registry import ModelRegistry
from llumnix_backend.requests import EmbeddingRequest, RequestError
from llumnix_server.streams import (
    client_request_ids,
    log_ignored_fields,
    refuse_unsupported_fields,
    unless_disconnected,
)
from llumnix_server.tokenizing import tokenize_prompts

# vLLM's embedding fields this server does not implement, refused when given a value that asks
# for something (a client may send the defaults).
_UNSUPPORTED = {"truncate_prompt_tokens": (None,), "truncation_side": (None,), "padding": (None,),
                "messages": (None,), "mm_processor_kwargs": (None,), "cache_salt": (None,),
                "embed_dtype": (None, "float32"), "endianness": (None, "native", "little")}


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # vLLM's extensions
    use_activation: bool | None = None
    add_special_tokens: bool = True
    priority: int | None = None
    request_id: str | None = None  # the response's id is `embd-<request_id>` (X-Request-Id wins)

    def refuse_unsupported(self) -> None:
        refuse_unsupported_fields(self.model_extra, _UNSUPPORTED)

    def priority_or_default(self, settings: PrioritySettings) -> int:
        return settings.default if self.priority is None else self.priority


def _encoded(embedding: list[float], encoding_format: str) -> list[float] | str:
    """As OpenAI's client decodes base64: little-endian float32."""
    if encoding_format == "float":
        return embedding
    return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode()


async def _all_of(work: list) -> list:
    """Every result, in order; the first failure cancels the rest (and is raised)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def create_embeddings_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
        arrival = time.monotonic()
        body.refuse_unsupported()
        log_ignored_fields("/v1/embeddings", body.model_extra, _UNSUPPORTED)
        model = registry.get(body.model)
        response_id, engine_id = client_request_ids("embd", request, body.request_id)
        try:
            prompts = await tokenize_prompts(model, body.input, body.add_special_tokens)
            priority = body.priority_or_default(model.config.scheduler.priority)
            inputs = [EmbeddingRequest(f"{engine_id}-{i}", tuple(ids), priority, body.dimensions,
                                       body.use_activation) for i, ids in enumerate(prompts)]
            vectors = await unless_disconnected(request, _all_of([model.embed(one, arrival) for one in inputs]))
        except RequestError as exc:  # (the core calls what it embeds the prompt)
            raise RequestError(str(exc), "input" if exc.field == "prompt" else exc.field) from None
        n_prompt = sum(len(ids) for ids in prompts)
        return {
            "id": response_id, "object": "list", "created": int(time.time()), "model": model.name,
            "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt},
        }

    return router
