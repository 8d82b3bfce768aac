"""vLLM's own utility routes, for clients and tools written against `vllm serve`: /health,
/ping, /version (open without an API key, as there), /tokenize and /detokenize."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from llumnix_backend.model_registry import ModelRegistry
from llumnix_backend.requests import RequestError
from llumnix_server.tokenizing import tokenize


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # vLLM's default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    tokens: list[int] = Field(min_length=1)


def create_vllm_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if registry.ready else 503)

    @router.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return Response(status_code=200 if registry.ready else 503)

    @router.get("/version")
    async def server_version() -> dict[str, str]:
        # vLLM's server reports vLLM's version; ours goes beside it (and stands in for it
        # without the vLLM backend).
        ours = version("llumnix-backend")
        return {"version": registry.engine_version("vllm") or ours, "llumnix_backend": ours}

    @router.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        model = registry.get(body.model)
        runtime = model.runtime
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give either prompt or messages", "prompt")
        if body.prompt is not None:
            tokens = await tokenize(runtime.encode, body.prompt, body.add_special_tokens is not False)
        else:
            template = {"add_generation_prompt": body.add_generation_prompt,
                        "continue_final_message": body.continue_final_message}
            tokens = await tokenize(lambda: runtime.render_chat(body.messages, bool(body.add_special_tokens),
                                                                model.config.frontend.chat_template, **template))
        result: dict[str, Any] = {"count": len(tokens), "max_model_len": runtime.max_model_len, "tokens": tokens}
        if body.return_token_strs:
            result["token_strs"] = runtime.token_strings(tokens)
        return result

    @router.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, str]:
        model = registry.get(body.model)
        model.check_token_ids(body.tokens, "tokens")
        return {"prompt": await tokenize(model.runtime.decode, body.tokens)}

    return router
