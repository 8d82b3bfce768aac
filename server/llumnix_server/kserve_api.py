"""KServe v2 / Triton API: health, metadata, readiness, config, statistics, the repository
index, `infer` with the tensors of Triton's vLLM backend (`kserve_infer`), and Triton's generate
extension as that backend serves it (`text_input` in, `text_output` out; `parameters` carry the
sampling fields and `priority`; `exclude_input_in_output`, default false, drops the prompt from a
non-streaming `text_output`). Every model route also answers under `/versions/{version}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llumnix_backend.model_registry import ModelNotFound, ModelRegistry, ModelState
from llumnix_backend.requests import GenerationDelta, GenerationRequest, RequestError, TokenLogprob
from llumnix_backend.served_model import ServedModel
from llumnix_server.errors import as_api_error, first_validation_problem
from llumnix_server.kserve_infer import HEADER_LENGTH, InferRequest, infer_response, parse_infer_request
from llumnix_server.sampling import SamplingFields, StructuredOutputs, finite_logprob
from llumnix_server.streams import new_request_id, started, unless_disconnected
from llumnix_server.tokenizing import tokenize

SERVER_NAME = "llumnix-backend"
EXTENSIONS = ["model_repository", "statistics", "binary_tensor_data", "generate", "llumnix"]


class GenerateParameters(SamplingFields):
    """Triton vLLM backend's request parameters, plus vLLM's sampling extensions."""

    model_config = ConfigDict(extra="forbid")

    stream: bool = False
    exclude_input_in_output: bool = False
    max_tokens: int | None = Field(default=16, ge=1)  # vLLM's default, as vllm_backend has it
    logprobs: int | None = Field(default=None, ge=0, le=20)  # the most likely tokens' logprobs per output token
    guided_decoding: StructuredOutputs | None = None  # vllm_backend's earlier name of structured_outputs
    lora_name: str | None = None  # vllm_backend's: refused, no model here serves LoRA adapters

    @field_validator("structured_outputs", "guided_decoding", mode="before")
    @classmethod
    def _from_json_text(cls, value: Any) -> Any:
        """vllm_backend takes these as JSON text (its clients send `json.dumps(...)`)."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None

    @field_validator("lora_name")
    @classmethod
    def _no_lora(cls, name: str | None) -> None:
        if name is not None:
            raise ValueError(f"LoRA adapter {name!r}: this server serves no LoRA adapters")

    def constraint_fields(self) -> dict[str, Any]:
        older = self.guided_decoding.engine_fields() if self.guided_decoding else {}
        return {**older, **super().constraint_fields()}

    def sampling(self, defaults: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
        fields = super().sampling(defaults, max_tokens)
        if self.logprobs is not None:
            fields["logprobs"] = self.logprobs
        return fields


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_input: str
    id: str | None = None
    parameters: GenerateParameters = GenerateParameters()
    # Triton's vLLM backend also takes these as inputs rather than parameters.
    stream: bool | None = None
    exclude_input_in_output: bool | None = None
    sampling_parameters: str | None = None

    def merged_parameters(self) -> GenerateParameters:
        params = self.parameters.model_dump(exclude_unset=True)
        if self.sampling_parameters:
            try:
                extra = json.loads(self.sampling_parameters)
            except json.JSONDecodeError as exc:
                raise RequestError(f"sampling_parameters is not valid JSON: {exc}", "sampling_parameters") from None
            if not isinstance(extra, dict):
                raise RequestError("sampling_parameters must be a JSON object", "sampling_parameters")
            params = {**params, **extra}  # (vllm_backend reads the tensor alone when it comes)
        for name in ("stream", "exclude_input_in_output"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        merged = parse_parameters(params)
        if merged.stream and "exclude_input_in_output" in params and not merged.exclude_input_in_output:
            # vllm_backend's rule: a streamed response never repeats the prompt.
            raise RequestError("exclude_input_in_output: false is not allowed when streaming",
                               "exclude_input_in_output")
        return merged


def parse_parameters(params: dict[str, Any]) -> GenerateParameters:
    try:
        return GenerateParameters.model_validate(params)
    except ValidationError as exc:
        raise RequestError(*first_validation_problem(exc.errors(), "parameters")) from None


def metadata_of(model: ServedModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "versions": [str(model.source.version)],
        "platform": model.config.backend,
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1]},
            {"name": "stream", "datatype": "BOOL", "shape": [1]},
            {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1]},
            {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1]},
        ],
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}],
    }


def config_of(model: ServedModel) -> dict[str, Any]:
    config = model.config
    metadata = metadata_of(model)
    scheduler = config.scheduler
    return {
        "name": model.name,
        "backend": config.backend,
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "instance_group": [{"name": model.name, "count": config.instances, "kind": "KIND_MODEL"}],
        "input": [{"name": i["name"], "data_type": f"TYPE_{i['datatype'].replace('BYTES', 'STRING')}", "dims": i["shape"]}
                  for i in metadata["inputs"]],
        "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]}],
        "parameters": {
            "dispatch_policy": {"string_value": scheduler.dispatch_policy.value},
            "priority": {"string_value": scheduler.priority.model_dump_json()},
            "migration": {"string_value": scheduler.migration.model_dump_json()},
        },
        "engine": model.runtime.describe(),
    }


def create_kserve_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": package_version("llumnix-backend"), "extensions": EXTENSIONS}

    @router.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @router.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if registry.ready else 503)

    # Each model route also answers under /versions/{version}: the version served, or 404.
    def both(method, path: str):
        def register(handler):
            method(path)(handler)
            return method(path.replace("{model_name}", "{model_name}/versions/{version}"))(handler)
        return register

    def versioned(model_name: str, version: str | None) -> None:
        """Raise ModelNotFound unless `version` is None or the version the model serves."""
        model = registry.entry(model_name).model
        served = str(model.source.version) if model is not None else None
        if version is not None and version != served:
            raise ModelNotFound(f"model {model_name!r} has no version {version!r} loaded"
                                + (f" (it serves version {served})" if served else ""))

    @router.get("/v2/models/stats")  # before /v2/models/{model_name}, which would take it
    async def all_stats() -> dict[str, Any]:
        return {"model_stats": [stats_of(e.model) for e in registry.entries() if e.model is not None]}

    @both(router.get, "/v2/models/{model_name}")
    async def model_metadata(model_name: str, version: str | None = None) -> dict[str, Any]:
        versioned(model_name, version)
        return metadata_of(registry.loaded(model_name))

    @both(router.get, "/v2/models/{model_name}/ready")
    async def model_ready(model_name: str, version: str | None = None) -> Response:
        entry = registry.entry(model_name)
        versioned(model_name, version)
        return Response(status_code=200 if entry.serving_state is ModelState.READY else 503)

    @both(router.get, "/v2/models/{model_name}/config")
    async def model_config(model_name: str, version: str | None = None) -> dict[str, Any]:
        versioned(model_name, version)
        return config_of(registry.loaded(model_name))

    @both(router.get, "/v2/models/{model_name}/stats")
    async def model_stats(model_name: str, version: str | None = None) -> dict[str, Any]:
        versioned(model_name, version)
        return {"model_stats": [stats_of(registry.loaded(model_name))]}

    @router.post("/v2/repository/index")
    async def repository_index() -> list[dict[str, Any]]:
        return [
            {"name": e.name, "version": str(e.model.source.version) if e.model else "", "state": e.serving_state.value,
             "reason": e.serving_reason}
            for e in registry.entries()
        ]

    # `path` captures names with slashes too, so that they get a clear 400, not a bare 404.
    @router.post("/v2/repository/models/{model_name:path}/load")
    async def repository_load(model_name: str, request: Request) -> dict[str, Any]:
        """Load or reload a model (explicit model control); `parameters.config`, a JSON model
        config, replaces the folder's config.yaml, as in Triton."""
        await registry.load_model(model_name, _config_override(await request.body()))
        return {}

    @router.post("/v2/repository/models/{model_name:path}/unload")
    async def repository_unload(model_name: str) -> dict[str, Any]:
        await registry.unload_model(model_name)
        return {}

    @both(router.post, "/v2/models/{model_name}/generate")
    async def generate(model_name: str, request: Request, version: str | None = None):
        versioned(model_name, version)
        return await _generate(registry, model_name, await _parse(request), request, stream_route=False)

    @both(router.post, "/v2/models/{model_name}/generate_stream")
    async def generate_stream(model_name: str, request: Request, version: str | None = None):
        versioned(model_name, version)
        return await _generate(registry, model_name, await _parse(request), request, stream_route=True)

    @both(router.post, "/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request, version: str | None = None):
        versioned(model_name, version)
        infer = parse_infer_request(await request.body(), request.headers.get(HEADER_LENGTH))
        if infer.inputs.get("stream"):
            raise RequestError("stream: streaming needs generate_stream (HTTP infer carries one response)", "stream")
        run = await start_infer(registry, model_name, infer, request)
        output = await collect_output(request, run.stream)
        return infer_response(run.envelope, infer_outputs(run, infer, output), infer.binary_out)

    return router


def _config_override(body: bytes) -> dict | None:
    """The `parameters.config` of a load request (a JSON string, or an object), if any."""
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise RequestError(f"the body is not valid JSON: {exc}") from None
    return config_override((data.get("parameters") or {}).get("config") if isinstance(data, dict) else None)


def config_override(config: Any) -> dict | None:
    """A load request's `parameters.config` (a JSON string, or an object) as a model config."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError as exc:
            raise RequestError(f"parameters.config is not valid JSON: {exc}", "parameters.config") from None
    if config is not None and not isinstance(config, dict):
        raise RequestError("parameters.config must be a JSON object (a model config)", "parameters.config")
    return config


async def _parse(request: Request) -> GenerateRequest:
    """The body is JSON whatever its content type says, as Triton reads it."""
    try:
        return GenerateRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestError(*first_validation_problem(exc.errors())) from None


@dataclass
class Run:
    """A started generate or infer request."""

    body: GenerateRequest
    params: GenerateParameters
    prompt_tokens: int
    envelope: dict[str, Any]
    stream: AsyncIterator[GenerationDelta]


@dataclass(frozen=True)
class InferOutput:
    """What an infer response reports of a request's output: all of it, or one streamed part."""

    text: str
    finish_reason: str | None
    num_tokens: int  # the tokens it carries
    cumulative_logprob: float | None = None  # of every token generated so far (engine logprobs asked)
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens it carries (engine logprobs asked)

    def then(self, delta: GenerationDelta) -> InferOutput:
        """The part `delta` adds after this one (the logprob still counts from the start)."""
        total = self.cumulative_logprob
        if delta.logprobs is not None:
            total = (total or 0.0) + sum(t.logprob or 0.0 for t in delta.logprobs)
        return InferOutput(delta.text, delta.finish_reason, len(delta.token_ids), total, delta.logprobs or ())


async def start_infer(registry: ModelRegistry, model_name: str, infer: InferRequest, request: Request | None) -> Run:
    """Start an infer request from its input tensors and its request-level parameters, which
    vllm_backend reads as sampling parameters (a `sampling_parameters` tensor's keys win)."""
    inputs = infer.inputs
    if "text_input" not in inputs:
        raise RequestError("the text_input input is missing", "text_input")
    body = GenerateRequest(text_input=inputs["text_input"], id=infer.client_id,
                           parameters=parse_parameters(infer.parameters),
                           sampling_parameters=inputs.get("sampling_parameters"),
                           stream=inputs.get("stream"), exclude_input_in_output=inputs.get("exclude_input_in_output"))
    return await _start(registry, model_name, body, request, bool(inputs.get("return_cumulative_logprob")))


def _logprobs_output(run: Run, output: InferOutput) -> str:
    """vllm_backend's `logprobs`: per token of the output, the sampled token and the most likely
    ones by token id (logprob, rank, text), as JSON; null unless the request asked for them."""
    if run.params.logprobs is None:
        return "null"
    return json.dumps([{str(r.token_id): {"logprob": finite_logprob(r.logprob), "rank": r.rank, "decoded_token": r.token}
                        for r in token.ranked} for token in output.logprobs])


def infer_outputs(run: Run, infer: InferRequest, output: InferOutput,
                  with_prompt: bool = True) -> dict[str, tuple[str, Any]]:
    """An infer response's output tensors (name: (datatype, value)): `text_output` (after the
    prompt unless `exclude_input_in_output`, or `with_prompt` is off as for a streamed part),
    and what the `return_*` inputs ask for; only those in `wanted` if it names any."""
    inputs, wanted = infer.inputs, infer.wanted
    prefix = run.body.text_input if with_prompt and not run.params.exclude_input_in_output else ""
    outputs = {"text_output": ("BYTES", prefix + output.text)}
    if inputs.get("return_finish_reason"):
        outputs["finish_reason"] = ("BYTES", output.finish_reason or "")
    if inputs.get("return_cumulative_logprob"):
        outputs["cumulative_logprob"] = ("FP32", output.cumulative_logprob or 0.0)
    if inputs.get("return_logprobs"):
        outputs["logprobs"] = ("BYTES", _logprobs_output(run, output))
    if inputs.get("return_num_input_tokens"):
        outputs["num_input_tokens"] = ("UINT32", run.prompt_tokens)
    if inputs.get("return_num_output_tokens"):
        outputs["num_output_tokens"] = ("UINT32", output.num_tokens)
    unknown = wanted - set(outputs)
    if unknown:
        raise RequestError(f"unknown or not requested output(s) {sorted(unknown)}; ask for one with its "
                           "return_* input", "outputs")
    return {k: v for k, v in outputs.items() if not wanted or k in wanted}


async def _start(registry: ModelRegistry, model_name: str, body: GenerateRequest, request: Request | None,
                 logprobs: bool = False) -> Run:
    """Start a generate or infer request: checked, tokenised, dispatched, its first output in
    (with an HTTP `request`, given up if its client goes away meanwhile). `logprobs`: the engine
    reports at least each generated token's own logprob."""
    arrival = time.monotonic()
    model = registry.get(model_name)
    params = body.merged_parameters()
    if not body.text_input:
        raise RequestError("text_input is empty", "text_input")
    # The id the server runs the request under is always its own (unique); the client's `id`
    # only comes back in the response, so two requests with the same id never mix.
    request_id = new_request_id("gen")
    prompt = await tokenize(model.runtime.encode, body.text_input)
    sampling = params.sampling(model.runtime.default_sampling(), params.max_tokens)
    if logprobs and sampling.get("logprobs") is None:
        sampling["logprobs"] = 0  # (the sampled token's alone)
    gen_request = GenerationRequest(
        request_id, tuple(prompt), sampling, params.priority_or_default(model.config.scheduler.priority), arrival,
    )
    stream = await started(request, model.generate(gen_request))
    envelope = {"id": body.id or request_id, "model_name": model.name, "model_version": str(model.source.version)}
    return Run(body, params, len(prompt), envelope, stream)


async def collect_output(request: Request | None, stream: AsyncIterator[GenerationDelta]) -> InferOutput:
    """A whole request's output (with an HTTP `request`, given up if its client goes away)."""

    async def collect() -> InferOutput:
        part, texts, logprobs, tokens, finish = InferOutput("", None, 0), [], [], 0, None
        async for delta in stream:
            part = part.then(delta)
            texts.append(part.text)
            logprobs.extend(part.logprobs)
            tokens += part.num_tokens
            finish = part.finish_reason or finish
        return InferOutput("".join(texts), finish, tokens, part.cumulative_logprob, tuple(logprobs))

    return await unless_disconnected(request, collect())


async def _generate(registry: ModelRegistry, model_name: str, body: GenerateRequest, request: Request,
                    stream_route: bool):
    run = await _start(registry, model_name, body, request)
    if stream_route or run.params.stream:
        return StreamingResponse(_generate_events(run.envelope, run.stream), media_type="text/event-stream")
    output = await collect_output(request, run.stream)
    prefix = "" if run.params.exclude_input_in_output else body.text_input
    return JSONResponse(dict(run.envelope, text_output=prefix + output.text))


def stats_of(model: ServedModel) -> dict[str, Any]:
    """Triton's statistics for a model (one inference per request: no batching here)."""
    stats = model.stats
    count = stats.success + stats.fail
    zero = {"count": 0, "ns": 0}
    return {
        "name": model.name, "version": str(model.source.version), "last_inference": stats.last_inference_ms,
        "inference_count": count, "execution_count": count,
        "inference_stats": {
            "success": {"count": stats.success, "ns": stats.success_ns},
            "fail": {"count": stats.fail, "ns": stats.fail_ns},
            "queue": {"count": stats.queue, "ns": stats.queue_ns},
            "compute_input": zero, "compute_infer": zero, "compute_output": zero, "cache_hit": zero, "cache_miss": zero,
        },
        "batch_stats": [],
    }


async def _generate_events(envelope: dict[str, Any], stream: AsyncIterator[GenerationDelta]) -> AsyncIterator[str]:
    try:
        async for delta in stream:
            event = dict(envelope, text_output=delta.text)
            if delta.finished:
                event["finish_reason"] = delta.finish_reason
            yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
    except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
        yield f"data: {json.dumps({'error': as_api_error(exc).message})}\n\n"

