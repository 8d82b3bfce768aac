"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

Sampling fields have the names and meanings of vLLM's own OpenAI server (its extensions
included: top_k, min_p, min_tokens, ignore_eos, repetition_penalty, ...); `priority` is
accepted as an extension field. Features this server does not implement (logprobs, echo,
tools, structured output) are refused with a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llumnix_backend.model_registry import ModelRegistry
from llumnix_backend.requests import GenerationDelta, GenerationRequest, RequestError
from llumnix_backend.served_model import ServedModel
from llumnix_server.errors import as_api_error
from llumnix_server.streams import merge_indexed, new_request_id, started, unless_disconnected

# Request fields passed to the engine under the same name (vLLM SamplingParams).
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "min_tokens",
    "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "logit_bias", "allowed_token_ids", "bad_words",
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprobs: Any = None

    def sampling(self, defaults: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
        if self.logprobs not in (None, False):
            raise RequestError("logprobs are not supported by this server", "logprobs")
        fields = dict(defaults)
        for name in SAMPLING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if "logit_bias" in fields:
            try:
                fields["logit_bias"] = {int(k): v for k, v in fields["logit_bias"].items()}
            except ValueError:
                raise RequestError("logit_bias keys must be token ids", "logit_bias") from None
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        else:
            fields.setdefault("max_tokens", None)  # vLLM then allows the rest of the context
        return fields


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _priority(model: ServedModel, body: _SamplingRequest) -> int:
    return model.config.scheduler.priority.default if body.priority is None else body.priority


def _chat_content(message: ChatMessage, index: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{index}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        content = "".join(texts)
    rendered = message.model_dump(exclude_none=True)
    rendered["content"] = content or ""
    return rendered


class _Choices:
    """The engine requests behind one API call: one per prompt and choice (n)."""

    def __init__(self, model: ServedModel, response_id: str, prompts: list[list[int]], body: _SamplingRequest,
                 max_tokens: int | None, arrival: float) -> None:
        sampling = body.sampling(model.runtime.default_sampling(), max_tokens)
        seed = sampling.get("seed")
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.requests = []
        for p_index, prompt in enumerate(prompts):
            for i in range(body.n):
                index = p_index * body.n + i
                choice_sampling = dict(sampling, seed=seed + i) if seed is not None and body.n > 1 else sampling
                request_id = response_id if len(prompts) * body.n == 1 else f"{response_id}-{index}"
                self.requests.append(
                    GenerationRequest(request_id, tuple(prompt), choice_sampling, _priority(model, body), arrival)
                )
        self.model = model

    def stream(self) -> AsyncIterator[tuple[int, GenerationDelta]]:
        return merge_indexed([self.model.generate(r) for r in self.requests])


def _completion_prompts(model: ServedModel, prompt: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        return [model.runtime.encode(prompt)]
    if not prompt:
        raise RequestError("the prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    return [model.runtime.encode(p) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]


def create_openai_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "llumnix-backend",
             "max_model_len": m.runtime.max_model_len}
            for m in registry.ready_models()
        ]
        return {"object": "list", "data": data}

    @router.get("/v1/models/{model_name}")
    async def get_model(model_name: str) -> dict[str, Any]:
        model = registry.get(model_name)
        return {"id": model.name, "object": "model", "created": 0, "owned_by": "llumnix-backend",
                "max_model_len": model.runtime.max_model_len}

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrival = time.monotonic()
        if body.echo:
            raise RequestError("echo is not supported by this server", "echo")
        if body.suffix:
            raise RequestError("suffix is not supported by this server", "suffix")
        model = registry.get(body.model)
        response_id = new_request_id("cmpl")
        choices = _Choices(model, response_id, _completion_prompts(model, body.prompt), body, body.max_tokens, arrival)
        envelope = {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model.name}
        stream = await started(request, choices.stream())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _completion_events(envelope, stream, choices.prompt_tokens, include_usage),
                media_type="text/event-stream", headers=SSE_HEADERS,
            )
        texts, finish, n_completion = await unless_disconnected(request, _collect(stream, len(choices.requests)))
        result = dict(envelope, choices=[
            {"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i][0], "stop_reason": finish[i][1]}
            for i in range(len(texts))
        ], usage=_usage(choices.prompt_tokens, n_completion))
        return JSONResponse(result)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrival = time.monotonic()
        if body.tools:
            raise RequestError("tools are not supported by this server", "tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise RequestError("only response_format type 'text' is supported", "response_format")
        model = registry.get(body.model)
        messages = [_chat_content(m, i) for i, m in enumerate(body.messages)]
        prompt = model.runtime.render_chat(messages)
        response_id = new_request_id("chatcmpl")
        max_tokens = body.max_completion_tokens or body.max_tokens
        choices = _Choices(model, response_id, [prompt], body, max_tokens, arrival)
        envelope = {"id": response_id, "created": int(time.time()), "model": model.name}
        stream = await started(request, choices.stream())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _chat_events(envelope, stream, body.n, choices.prompt_tokens, include_usage),
                media_type="text/event-stream", headers=SSE_HEADERS,
            )
        texts, finish, n_completion = await unless_disconnected(request, _collect(stream, body.n))
        result = dict(envelope, object="chat.completion", choices=[
            {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
             "finish_reason": finish[i][0], "stop_reason": finish[i][1]}
            for i in range(body.n)
        ], usage=_usage(choices.prompt_tokens, n_completion))
        return JSONResponse(result)

    return router


async def _collect(stream: AsyncIterator[tuple[int, GenerationDelta]], n: int) -> tuple[list[str], list[tuple], int]:
    parts: list[list[str]] = [[] for _ in range(n)]
    finish: list[tuple] = [(None, None)] * n
    n_tokens = 0
    async for index, delta in stream:
        parts[index].append(delta.text)
        n_tokens += len(delta.token_ids)
        if delta.finished:
            finish[index] = (delta.finish_reason, delta.stop_reason)
    return ["".join(p) for p in parts], finish, n_tokens


def _error_event(exc: Exception) -> str:
    err = as_api_error(exc)
    return _sse({"error": {"message": err.message, "type": "InternalServerError", "code": err.status}})


async def _completion_events(envelope: dict[str, Any], stream: AsyncIterator[tuple[int, GenerationDelta]],
                             n_prompt: int, include_usage: bool) -> AsyncIterator[str]:
    n_tokens = 0
    try:
        async for index, delta in stream:
            if not delta.token_ids and not delta.finished:
                continue  # a prefill chunk: nothing to tell the client yet
            n_tokens += len(delta.token_ids)
            choice = {"index": index, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}
            if delta.finished:
                choice["stop_reason"] = delta.stop_reason
            yield _sse(dict(envelope, choices=[choice]))
    except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
        yield _error_event(exc)
    if include_usage:
        yield _sse(dict(envelope, choices=[], usage=_usage(n_prompt, n_tokens)))
    yield "data: [DONE]\n\n"


async def _chat_events(envelope: dict[str, Any], stream: AsyncIterator[tuple[int, GenerationDelta]], n: int,
                       n_prompt: int, include_usage: bool) -> AsyncIterator[str]:
    chunk = dict(envelope, object="chat.completion.chunk")
    for index in range(n):
        yield _sse(dict(chunk, choices=[{"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
    n_tokens = 0
    try:
        async for index, delta in stream:
            if not delta.token_ids and not delta.finished:
                continue  # a prefill chunk: nothing to tell the client yet
            n_tokens += len(delta.token_ids)
            choice = {"index": index, "delta": {"content": delta.text} if delta.text else {},
                      "logprobs": None, "finish_reason": delta.finish_reason}
            if delta.finished:
                choice["stop_reason"] = delta.stop_reason
            yield _sse(dict(chunk, choices=[choice]))
    except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
        yield _error_event(exc)
    if include_usage:
        yield _sse(dict(chunk, choices=[], usage=_usage(n_prompt, n_tokens)))
    yield "data: [DONE]\n\n"
