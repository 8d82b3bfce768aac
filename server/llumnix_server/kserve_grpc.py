"""KServe v2 over gRPC (`--grpc-port`, default 8001), as Triton serves it, so that
`tritonclient.grpc` works unchanged: health, server and model metadata, model config and
statistics, the repository index with load and unload, `ModelInfer`, and `ModelStreamInfer`
for a decoupled model (one response per output delta with `stream: true`, then an empty one
marked `triton_final_response`, as Triton sends them for vllm_backend models).

It runs in the HTTP server's event loop over the same registry, and answers from the same
functions as the HTTP routes (`kserve_api`); errors map to gRPC status codes from the HTTP
status the core error has there. The service and messages are those tritonclient ships.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version as package_version
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from llumnix_backend.model_registry import ModelNotFound, ModelRegistry, ModelState
from llumnix_backend.requests import RequestError
from llumnix_server.errors import as_api_error
from llumnix_server.kserve_api import (
    EXTENSIONS, SERVER_NAME, InferOutput, collect_output, config_of, config_override, infer_outputs, metadata_of,
    start_infer, stats_of,
)
from llumnix_server.kserve_infer import (
    InferRequest,
    check_input_name,
    checked_input,
    decode_tensor,
    encode_tensor,
    sampling_parameters_of,
)

GRPC_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
               404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
               413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
               504: grpc.StatusCode.DEADLINE_EXCEEDED}
# As on HTTP: health needs no key; with an operations key set, only it opens load and unload.
OPEN_CALLS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
OPERATIONS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})
MAX_RESPONSE_BYTES = 64 << 20


def _infer_request(request: service_pb2.ModelInferRequest) -> InferRequest:
    """The request's input values by name (from `raw_input_contents`, as tritonclient sends
    them, or typed `contents`), its parameters and the outputs it asks for."""
    inputs: dict[str, Any] = {}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"{len(raw)} raw input contents for {len(request.inputs)} inputs", "inputs")
    for i, tensor in enumerate(request.inputs):
        check_input_name(tensor.name)
        if raw:
            values = decode_tensor(tensor.datatype, raw[i], tensor.name)
        elif tensor.datatype == "BYTES":
            values = [b.decode("utf-8", errors="replace") for b in tensor.contents.bytes_contents]
        else:
            values = list(tensor.contents.bool_contents)
        inputs[tensor.name] = checked_input(tensor.name, values)
    parameters = {name: getattr(value, value.WhichOneof("parameter_choice"))
                  for name, value in request.parameters.items() if value.WhichOneof("parameter_choice")}
    return InferRequest(inputs, sampling_parameters_of(parameters), request.id or None,
                        {o.name for o in request.outputs})


def _response(envelope: dict[str, Any], outputs: dict[str, tuple[str, Any]],
              final: bool | None = None) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name=envelope["model_name"], model_version=envelope["model_version"],
                                              id=envelope["id"])
    for name, (datatype, value) in outputs.items():
        response.outputs.add(name=name, datatype=datatype, shape=[1])
        response.raw_output_contents.append(encode_tensor(datatype, value))
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return response


class KServeGrpcService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def _versioned(self, name: str, version: str):
        model = self._registry.loaded(name)
        if version and version != str(model.source.version):
            raise ModelNotFound(f"model {name!r} has no version {version!r} loaded "
                                f"(it serves version {model.source.version})")
        return model

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self._registry.ready)

    async def ModelReady(self, request, context):
        try:
            entry = self._registry.entry(request.name)
            self._versioned(request.name, request.version)
        except ModelNotFound:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=entry.serving_state is ModelState.READY)

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=package_version("llumnix-backend"),
                                                  extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        metadata = metadata_of(self._versioned(request.name, request.version))
        return json_format.ParseDict(metadata, service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        config = json_format.ParseDict(config_of(self._versioned(request.name, request.version)),
                                       model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        if request.name:
            models = [self._versioned(request.name, request.version)]
        else:
            models = [e.model for e in self._registry.entries() if e.model is not None]
        return json_format.ParseDict({"model_stats": [stats_of(m) for m in models]},
                                     service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        response = service_pb2.RepositoryIndexResponse()
        for e in self._registry.entries():
            if request.ready and e.serving_state is not ModelState.READY:
                continue
            response.models.add(name=e.name, version=str(e.model.source.version) if e.model else "",
                                state=e.serving_state.value, reason=e.serving_reason or "")
        return response

    async def RepositoryModelLoad(self, request, context):
        config = request.parameters["config"].string_param if "config" in request.parameters else None
        await self._registry.load_model(request.model_name, config_override(config))
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._registry.unload_model(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request, context):
        self._versioned(request.model_name, request.model_version)
        infer = _infer_request(request)
        if infer.inputs.get("stream"):
            raise RequestError("stream: a streamed request needs ModelStreamInfer (ModelInfer carries one response)",
                               "stream")
        run = await start_infer(self._registry, request.model_name, infer, None)
        return _response(run.envelope, infer_outputs(run, infer, await collect_output(None, run.stream)))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Each request on the stream is served as it arrives, beside those still running, as
        Triton serves a decoupled model: its responses in order, then its final marker,
        interleaved with the others'. A failed request answers with `error_message`; the stream
        goes on. When the client goes, what still runs is aborted."""
        responses: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        def served(task: asyncio.Task) -> None:
            running.discard(task)
            responses.put_nowait(_SERVED)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._serve_streamed(request, responses.put_nowait))
                    running.add(task)
                    task.add_done_callback(served)
            finally:
                responses.put_nowait(_READ_ALL)

        reader = asyncio.create_task(read())
        try:
            read_all = False
            while not (read_all and not running and responses.empty()):
                item = await responses.get()
                if item is _READ_ALL:
                    read_all = True
                elif item is not _SERVED:
                    yield item
        finally:
            for task in (reader, *running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)

    async def _serve_streamed(self, request: service_pb2.ModelInferRequest,
                              send: Callable[[service_pb2.ModelStreamInferResponse], None]) -> None:
        try:
            self._versioned(request.model_name, request.model_version)
            infer = _infer_request(request)
            run = await start_infer(self._registry, request.model_name, infer, None)
            if run.params.stream:
                part = InferOutput("", None, 0)
                async for delta in run.stream:
                    # num_output_tokens: the tokens this response carries (vllm_backend's meaning).
                    part = part.then(delta)
                    outputs = infer_outputs(run, infer, part, with_prompt=False)
                    send(service_pb2.ModelStreamInferResponse(infer_response=_response(run.envelope, outputs,
                                                                                       final=False)))
                send(service_pb2.ModelStreamInferResponse(infer_response=_response(run.envelope, {}, final=True)))
            else:
                outputs = infer_outputs(run, infer, await collect_output(None, run.stream))
                send(service_pb2.ModelStreamInferResponse(infer_response=_response(run.envelope, outputs, final=True)))
        except Exception as exc:  # noqa: BLE001 - reported in-band, as Triton does
            send(service_pb2.ModelStreamInferResponse(error_message=as_api_error(exc).message))


# What ModelStreamInfer's queue carries besides responses: the stream has no more requests; a
# request is served.
_READ_ALL, _SERVED = object(), object()


class _StatusInterceptor(grpc.aio.ServerInterceptor):
    """API keys (`authorization: Bearer KEY` metadata, as on HTTP), and core errors as gRPC
    status codes on unary calls."""

    def __init__(self, api_key: str | None, operations_key: str | None) -> None:
        self._client = f"Bearer {api_key}" if api_key else None
        self._operator = f"Bearer {operations_key}" if operations_key else None

    def _refusal(self, details: grpc.HandlerCallDetails) -> str | None:
        """Why the call may not run, or None; the rules of the HTTP server's `ApiKeyMiddleware`."""
        if details.method.rsplit("/", 1)[-1] in OPEN_CALLS:
            return None
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if self._operator is not None and hmac.compare_digest(given, self._operator):
            return None
        if self._operator is not None and details.method.rsplit("/", 1)[-1] in OPERATIONS:
            return "invalid or missing API key: this call needs the operations key"
        if self._client is None or hmac.compare_digest(given, self._client):
            return None
        return "invalid or missing API key: this call needs one (metadata 'authorization: Bearer KEY')"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        refusal = self._refusal(details)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def call(request, context):
                if refusal:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
                try:
                    return await unary(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped like the HTTP server maps it
                    error = as_api_error(exc)
                    await context.abort(GRPC_STATUS.get(error.status, grpc.StatusCode.INTERNAL), error.message)

            return grpc.unary_unary_rpc_method_handler(call, handler.request_deserializer, handler.response_serializer)
        streaming = handler.stream_stream  # ModelStreamInfer: errors travel in-band

        async def stream(request_iterator, context):
            if refusal:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
            async for response in streaming(request_iterator, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


def create_grpc_server(registry: ModelRegistry, host: str, port: int, api_key: str | None = None,
                       operations_key: str | None = None, max_request_bytes: int = 4 << 20) -> grpc.aio.Server:
    """The gRPC server, bound to `host:port` (not started)."""
    options = [("grpc.max_receive_message_length", max_request_bytes),
               ("grpc.max_send_message_length", MAX_RESPONSE_BYTES)]
    server = grpc.aio.server(interceptors=[_StatusInterceptor(api_key, operations_key)], options=options)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeGrpcService(registry), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    return server
