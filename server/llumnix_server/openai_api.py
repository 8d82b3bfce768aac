"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

Sampling fields have the names and meanings of vLLM's own OpenAI server (its extensions
included: top_k, min_p, min_tokens, ignore_eos, repetition_penalty, ...); `priority` is
accepted as an extension field. Structured outputs (`response_format`, `structured_outputs`
and the older `guided_*` fields) are enforced by the engine. `echo` and `prompt_logprobs` work
as in vLLM, and so do tools: the backend's parser (vLLM's, named in the model's `frontend:`
settings) constrains and reads the output. Fields vLLM's server takes that
this one does not implement (`UNSUPPORTED`) are refused with a 400 naming the field, never
silently ignored; other unknown fields are ignored with a warning in the log, as vLLM's server
ignores them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llumnix_backend.model_registry import ModelRegistry
from llumnix_backend.plugin import TOOL_FIELDS, ChatTools, ToolCallReader
from llumnix_backend.request_accounting import ChoiceGroup
from llumnix_backend.requests import (
    GenerationDelta,
    GenerationRequest,
    PromptLogprobs,
    RankedLogprob,
    RequestError,
    TokenLogprob,
)
from llumnix_backend.served_model import ServedModel
from llumnix_server.errors import as_api_error
from llumnix_server.sampling import SamplingFields, finite_logprob, structured_outputs
from llumnix_server.streams import (
    client_request_ids,
    log_ignored_fields,
    merge_indexed,
    refuse_unsupported_fields,
    started,
    unless_disconnected,
)
from llumnix_server.tokenizing import tokenize, tokenize_prompts

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Fields of vLLM's completion and chat requests that this server does not implement, each with
# the values that ask for nothing (vLLM 0.32's defaults, which a client may spell out): any other
# value is a 400 naming the field. `include_reasoning` does nothing in vLLM either without a
# reasoning parser, which no model here has.
UNSUPPORTED = {name: (None,) for name in (
    "logprob_token_ids", "suffix", "truncate_prompt_tokens", "truncation_side", "prompt_embeds", "documents",
    "media_io_kwargs", "mm_processor_kwargs", "return_mm_kwargs", "return_tokens_as_token_ids",
    "return_prompt_text", "kv_transfer_params", "ec_transfer_params", "vllm_xargs", "repetition_detection",
    "thinking_token_budget", "reasoning_effort", "watermarking", "stream_interval", "session_id", "cache_salt",
    "chat_template")} | {
    "use_beam_search": (None, False), "length_penalty": (None, 1.0), "mm_payload": (None, "tensors"),
    "return_token_offsets": (None, False), "routed_experts_prompt_start": (None, 0),
    "include_reasoning": (None, True, False)}
# Of a chat request's undeclared fields, those the route reads (any other is logged as ignored).
_CHAT_EXTRA_READ = frozenset(UNSUPPORTED) | frozenset(TOOL_FIELDS)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # with include_usage: the usage so far in every chunk

    @property
    def usage_in_every_chunk(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")

    model: str
    request_id: str | None = None  # vLLM's: the response's id is `cmpl-<request_id>` (X-Request-Id wins)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    spaces_between_special_tokens: bool | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extension: each choice (each streamed chunk) also carries its token ids.
    return_token_ids: bool = False
    echo: bool | None = False  # completions: the prompt before each choice; chat: the last message
    # vLLM's extension: the prompt's logprobs too, this many most likely per token.
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def refuse_unsupported(self) -> None:
        refuse_unsupported_fields(self.model_extra, UNSUPPORTED)
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            raise RequestError("stream_options can only be given with stream: true", "stream_options")

    def constraint_fields(self) -> dict[str, Any]:
        given = super().constraint_fields()
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return given
        if fmt.type == "structural_tag":
            raise RequestError("response_format type 'structural_tag' is not supported here; "
                               "give structured_outputs.structural_tag", "response_format")
        if fmt.type == "json_object":
            given["json_object"] = True
        elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise RequestError("response_format.json_schema.schema: missing", "response_format")
        else:
            given["json"] = fmt.json_schema.schema_
        structured_outputs(given, "response_format")  # one constraint only
        return given

    def logprobs_wanted(self) -> int | None:
        """How many most likely tokens to report at each position; None: no logprobs."""
        return None

    def top_n_asked(self) -> int | None:
        """The request's own count of most likely tokens (`logprobs` or `top_logprobs`)."""
        return None

    def sampling(self, defaults: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
        self.refuse_unsupported()
        fields = super().sampling(defaults, max_tokens)
        if (top_n := self.logprobs_wanted()) is not None:
            fields["logprobs"] = top_n
        if self.stream and self.prompt_logprobs:
            raise RequestError("prompt_logprobs are not available when stream is true", "prompt_logprobs")
        # As in vLLM: with echo, the prompt's logprobs come at the request's count of top tokens.
        prompt_logprobs = self.top_n_asked() if self.prompt_logprobs is None and self.echo else self.prompt_logprobs
        if prompt_logprobs is not None:
            fields["prompt_logprobs"] = prompt_logprobs
        if "logit_bias" in fields:
            try:
                fields["logit_bias"] = {int(k): v for k, v in fields["logit_bias"].items()}
            except ValueError:
                raise RequestError("logit_bias keys must be token ids", "logit_bias") from None
        return fields

    @property
    def streamed_usage(self) -> StreamOptions:
        return self.stream_options or StreamOptions()


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    add_special_tokens: bool = True  # (vLLM's default for completions: a BOS token where the model has one)
    max_tokens: int | None = Field(default=16, ge=0)  # 0: with echo, the prompt alone (as vLLM)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def top_n_asked(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # How the chat template renders the conversation (vLLM's fields; a template of the
    # request's own is refused, as vLLM refuses it unless told to trust requests).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # on top of the template's own (vLLM's default: none)
    chat_template_kwargs: dict[str, Any] | None = None

    def logprobs_wanted(self) -> int | None:
        if self.top_logprobs and not self.logprobs:  # (0 asks for nothing, as in vLLM)
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def top_n_asked(self) -> int | None:
        return self.top_logprobs

    def echoed_text(self) -> str:
        """What `echo` puts before each choice's content, as vLLM: the last message's, if it
        has the role the reply takes (the assistant's, unless continuing the final message)."""
        last = self.messages[-1]
        role = "assistant" if self.add_generation_prompt else last.role
        if not self.echo or last.role != role or not last.content:
            return ""
        content = last.content
        return content if isinstance(content, str) else "\n".join(part.get("text", "") for part in content)

    def tools(self, model: ServedModel, messages: list[dict[str, Any]]) -> ChatTools | None:
        """The request's tools, as the model's backend handles them (None: no tools)."""
        given = {key: value for key, value in (self.model_extra or {}).items()
                 if key in TOOL_FIELDS and value is not None}
        if not given:
            return None
        if self.echo:
            raise RequestError("echo cannot be combined with tools", "echo")
        constraint = structured_outputs(self.constraint_fields(), "structured_outputs")
        return model.runtime.chat_tools({"model": self.model, **given}, messages, constraint, model.config.frontend)

    def template_arguments(self) -> dict[str, Any]:
        for key in ("chat_template", "tokenize"):
            if key in (self.chat_template_kwargs or {}):
                raise RequestError(f"chat_template_kwargs.{key} is not accepted", "chat_template_kwargs")
        if self.add_generation_prompt and self.continue_final_message:
            raise RequestError("add_generation_prompt and continue_final_message cannot both be true",
                               "continue_final_message")
        return {**(self.chat_template_kwargs or {}), "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


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


@dataclass(frozen=True)
class _Echo:
    """What the choices of an `echo` request start with: their prompt (completions, with its
    logprobs if asked) or the last message (chat, its text only, as vLLM)."""

    text: str
    first_token: str = ""  # the text of its first token, the only one without a logprob
    top_n: int | None = None  # the request's `logprobs`: None, no logprobs
    # max_tokens 0: the engine makes one token (it cannot make none), which the choice leaves
    # out of its text and logprobs; vLLM counts it in the usage, and so does this server.
    prompt_only: bool = False

    def onto(self, delta: GenerationDelta) -> GenerationDelta:
        """A choice's first output with the prompt's text, and its logprobs, before its own."""
        own_text, own_logprobs = ("", None) if self.prompt_only else (delta.text, delta.logprobs)
        logprobs = own_logprobs
        if self.top_n is not None and delta.prompt_logprobs is not None:
            logprobs = tuple(self._as_output(p) for p in delta.prompt_logprobs) + (own_logprobs or ())
        return replace(delta, text=self.text + own_text, logprobs=logprobs)

    def _as_output(self, position: tuple[RankedLogprob, ...] | None) -> TokenLogprob:
        if position is None:
            return TokenLogprob(self.first_token, None)
        own = position[0]
        ranked = sorted(position, key=lambda c: c.rank)[:self.top_n]
        return TokenLogprob(own.token, own.logprob, tuple((c.token, c.logprob) for c in ranked))


async def _echoed(deltas: AsyncIterator[GenerationDelta], echo: _Echo) -> AsyncIterator[GenerationDelta]:
    """A choice's output with its prompt echoed before its first tokens."""
    pending = True
    try:
        async for delta in deltas:
            if pending and (delta.token_ids or delta.finished):  # (not a prefill chunk)
                delta, pending = echo.onto(delta), False
            yield delta
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]


class _Choices:
    """The engine requests behind one API call: one per prompt and choice (n)."""

    def __init__(self, model: ServedModel, engine_id: str, prompts: list[list[int]], body: _SamplingRequest,
                 max_tokens: int | None, arrival: float, echoes: Sequence[_Echo] | None = None,
                 tools: ChatTools | None = None) -> None:
        """`engine_id`: what the engine requests are keyed by (`client_request_ids`); `echoes`:
        one per prompt, for an `echo` request; `tools`: a chat request's."""
        sampling = body.sampling(model.runtime.default_sampling(), max_tokens)
        if tools is not None:
            sampling = tools.sampling(sampling)
        seed = sampling.get("seed")
        priority = body.priority_or_default(model.config.scheduler.priority)
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.requests = []
        self._groups = []  # each request's: the choices of its prompt
        for p_index, prompt in enumerate(prompts):
            group = ChoiceGroup(body.n)
            for i in range(body.n):
                index = p_index * body.n + i
                choice_sampling = dict(sampling, seed=seed + i) if seed is not None and body.n > 1 else sampling
                request_id = engine_id if len(prompts) * body.n == 1 else f"{engine_id}-{index}"
                self.requests.append(
                    GenerationRequest(request_id, tuple(prompt), choice_sampling, priority, arrival)
                )
                self._groups.append(group)
        self._echoes = [echo for echo in echoes for _ in range(body.n)] if echoes else None
        self.model = model
        # One reader of tool calls per choice, if the output is read for them.
        self.readers: list[ToolCallReader] | None = None
        if tools is not None:
            readers = [tools.reader(r.prompt_token_ids) for r in self.requests]
            self.readers = None if None in readers else readers  # type: ignore[assignment]

    def stream(self) -> AsyncIterator[tuple[int, GenerationDelta]]:
        streams = [self.model.generate(r, g) for r, g in zip(self.requests, self._groups)]
        if self._echoes is not None:
            streams = [_echoed(s, echo) for s, echo in zip(streams, self._echoes)]
        return merge_indexed(streams)


async def _echoes(model: ServedModel, prompt: str | list[int] | list[str] | list[list[int]],
                  prompts: list[list[int]], top_n: int | None, prompt_only: bool) -> list[_Echo]:
    """What each prompt's choices echo: the text given, or given token ids decoded as vLLM
    decodes them (special tokens kept), on the tokenizer thread."""
    runtime = model.runtime
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt[0], str):
        texts = list(prompt)  # type: ignore[arg-type]
    else:
        texts = [await tokenize(runtime.decode, ids, False) for ids in prompts]
    return [_Echo(text, runtime.decode(ids[:1], False), top_n, prompt_only) for text, ids in zip(texts, prompts)]


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
        body.refuse_unsupported()
        log_ignored_fields("/v1/completions", body.model_extra, UNSUPPORTED)
        model = registry.get(body.model)
        response_id, engine_id = client_request_ids("cmpl", request, body.request_id)
        prompt_only = body.max_tokens == 0
        if prompt_only and not body.echo:
            raise RequestError("max_tokens: 0 generates nothing; it needs echo (the prompt alone)", "max_tokens")
        prompts = await tokenize_prompts(model, body.prompt, body.add_special_tokens)
        echoes = await _echoes(model, body.prompt, prompts, body.logprobs, prompt_only) if body.echo else None
        choices = _Choices(model, engine_id, prompts, body, 1 if prompt_only else body.max_tokens, arrival, echoes)
        envelope = {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model.name}
        return await _respond(request, body, choices, envelope, _COMPLETION)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrival = time.monotonic()
        body.refuse_unsupported()
        log_ignored_fields("/v1/chat/completions", body.model_extra, _CHAT_EXTRA_READ)
        model = registry.get(body.model)
        messages = [_chat_content(m, i) for i, m in enumerate(body.messages)]
        tools = body.tools(model, messages)
        template = body.template_arguments()
        if tools is not None and tools.template_tools is not None:
            template["tools"] = tools.template_tools
        prompt = await tokenize(lambda: model.runtime.render_chat(messages, body.add_special_tokens,
                                                                  model.config.frontend.chat_template, **template))
        response_id, engine_id = client_request_ids("chatcmpl", request, body.request_id)
        max_tokens = body.max_completion_tokens or body.max_tokens
        echoed = body.echoed_text()
        choices = _Choices(model, engine_id, [prompt], body, max_tokens, arrival,
                           [_Echo(echoed)] if echoed else None, tools)
        envelope = {"id": response_id, "created": int(time.time()), "model": model.name}
        return await _respond(request, body, choices, envelope, _CHAT)

    return router


def _completion_logprobs(tokens: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """OpenAI's completions logprobs; `text_offset`: where the first token's text starts. A token
    without a logprob (an echoed prompt's first) has null ones."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token.token)
    return {"tokens": [t.token for t in tokens],
            "token_logprobs": [None if t.logprob is None else finite_logprob(t.logprob) for t in tokens],
            "top_logprobs": [None if t.logprob is None else {text: finite_logprob(lp) for text, lp in t.top} for t in tokens],
            "text_offset": offsets}


def _prompt_logprobs(positions: PromptLogprobs) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, by token id."""
    return [None if candidates is None else
            {str(c.token_id): {"logprob": finite_logprob(c.logprob), "rank": c.rank, "decoded_token": c.token}
             for c in candidates}
            for candidates in positions]


def _chat_logprobs(tokens: Sequence[TokenLogprob], _: int) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": finite_logprob(logprob), "bytes": list(text.encode())}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*c) for c in t.top]} for t in tokens]}


@dataclass(frozen=True)
class _Shape:
    """How one endpoint lays out a choice's text: completions and chat differ only here."""

    response_object: str
    chunk_object: str
    full: Callable[[str], dict[str, Any]]  # the whole text of a finished choice
    delta: Callable[[str], dict[str, Any]]  # one streamed piece
    logprobs: Callable[[Sequence[TokenLogprob], int], dict[str, Any]]  # tokens, and where their text starts
    stream_preamble: dict[str, Any] | None = None  # sent once per choice before any token
    prompt_logprobs_per_choice: bool = True  # else once, in the response (chat, as vLLM)


_COMPLETION = _Shape("text_completion", "text_completion", lambda t: {"text": t}, lambda t: {"text": t},
                     _completion_logprobs)
_CHAT = _Shape(
    "chat.completion", "chat.completion.chunk",
    full=lambda t: {"message": {"role": "assistant", "content": t}},
    delta=lambda t: {"delta": {"content": t} if t else {}},
    logprobs=_chat_logprobs,
    stream_preamble={"delta": {"role": "assistant", "content": ""}},
    prompt_logprobs_per_choice=False,
)


async def _respond(request: Request, body: _SamplingRequest, choices: _Choices, envelope: dict[str, Any],
                   shape: _Shape):
    stream = await started(request, choices.stream())
    n_choices = len(choices.requests)
    readers = choices.readers
    if body.stream:
        events = _events(dict(envelope, object=shape.chunk_object), stream, shape, n_choices,
                         choices.prompt_tokens, body.streamed_usage, body.return_token_ids, readers)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    collected = await unless_disconnected(request, _collect(stream, n_choices))
    result_choices = []
    for i, choice in enumerate(collected):
        logprobs = shape.logprobs(choice.logprobs, 0) if body.logprobs_wanted() is not None else None
        text, finish_reason = "".join(choice.texts), choice.finish_reason
        if readers is None:
            output = shape.full(text)
        else:
            output = {"message": readers[i].whole(text, choice.token_ids)}
            finish_reason = readers[i].finish_reason(finish_reason)
        result_choices.append({"index": i, **output, "logprobs": logprobs,
                               "finish_reason": finish_reason, "stop_reason": choice.stop_reason})
        if body.return_token_ids:
            result_choices[-1]["token_ids"] = choice.token_ids
        if choice.prompt_logprobs is not None and shape.prompt_logprobs_per_choice:
            result_choices[-1]["prompt_logprobs"] = _prompt_logprobs(choice.prompt_logprobs)
    n_completion = sum(len(c.token_ids) for c in collected)
    response = dict(envelope, object=shape.response_object, choices=result_choices,
                    usage=_usage(choices.prompt_tokens, n_completion))
    if not shape.prompt_logprobs_per_choice and collected[0].prompt_logprobs is not None:
        response["prompt_logprobs"] = _prompt_logprobs(collected[0].prompt_logprobs)  # (one prompt)
    return JSONResponse(response)


@dataclass
class _CollectedChoice:
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


async def _collect(stream: AsyncIterator[tuple[int, GenerationDelta]], n: int) -> list[_CollectedChoice]:
    choices = [_CollectedChoice() for _ in range(n)]
    async for index, delta in stream:
        choice = choices[index]
        choice.texts.append(delta.text)
        choice.token_ids.extend(delta.token_ids)
        choice.logprobs.extend(delta.logprobs or ())
        if delta.prompt_logprobs is not None:
            choice.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
    return choices


async def _events(chunk: dict[str, Any], stream: AsyncIterator[tuple[int, GenerationDelta]], shape: _Shape,
                  n_choices: int, n_prompt: int, usage: StreamOptions, token_ids: bool,
                  readers: Sequence[ToolCallReader] | None = None) -> AsyncIterator[str]:
    if shape.stream_preamble is not None:
        for index in range(n_choices):
            choice = {"index": index, **shape.stream_preamble, "logprobs": None, "finish_reason": None}
            yield _sse(dict(chunk, choices=[choice]))
    n_tokens = 0
    text_offsets = [0] * n_choices  # each choice's text so far, for its logprobs' offsets
    try:
        async for index, delta in stream:
            if not delta.token_ids and not delta.finished:
                continue  # a prefill chunk: nothing to tell the client yet
            n_tokens += len(delta.token_ids)
            logprobs = shape.logprobs(delta.logprobs, text_offsets[index]) if delta.logprobs else None
            text_offsets[index] += len(delta.text)
            output, finish_reason = shape.delta(delta.text), delta.finish_reason
            if readers is not None:
                message = readers[index].delta(delta.text, delta.token_ids, delta.finished)
                if message is None and not delta.finished and logprobs is None:
                    continue  # (the text so far may still open a tool call)
                output = {"delta": message or {}}
                finish_reason = readers[index].finish_reason(finish_reason) if delta.finished else None
            choice = {"index": index, **output, "logprobs": logprobs, "finish_reason": finish_reason}
            if delta.finished:
                choice["stop_reason"] = delta.stop_reason
            if token_ids:
                choice["token_ids"] = list(delta.token_ids)
            if usage.usage_in_every_chunk:
                yield _sse(dict(chunk, choices=[choice], usage=_usage(n_prompt, n_tokens)))
            else:
                yield _sse(dict(chunk, choices=[choice]))
    except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
        err = as_api_error(exc)
        yield _sse({"error": {"message": err.message, "type": "InternalServerError", "code": err.status}})
        return  # no [DONE]: the stream did not complete, and clients must not take it as done
    if usage.include_usage:
        yield _sse(dict(chunk, choices=[], usage=_usage(n_prompt, n_tokens)))
    yield "data: [DONE]\n\n"
