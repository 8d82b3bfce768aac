"""KServe v2 `infer` with the tensors of Triton's vLLM backend, so that `tritonclient`'s
`infer()` works unchanged.

Inputs (each of shape [1]): `text_input` (BYTES), and optionally `sampling_parameters` (BYTES, a
JSON object), `exclude_input_in_output`, `stream`, `return_finish_reason`,
`return_cumulative_logprob`, `return_logprobs`, `return_num_input_tokens` and
`return_num_output_tokens` (BOOL). Outputs: `text_output`, and `finish_reason`,
`cumulative_logprob` (FP32: of every token generated so far), `logprobs` (JSON: per token, the
most likely tokens by id, with `logprobs: N` in the sampling parameters), `num_input_tokens`,
`num_output_tokens` when asked for. Tensors travel as JSON
`data` or in Triton's binary tensor extension (the JSON header's length in
`Inference-Header-Content-Length`, then the raw tensors; BYTES elements are a 4-byte
little-endian length and the bytes), which tritonclient uses by default. Streaming needs a
decoupled model, which HTTP infer cannot carry: `stream: true` is refused (use
`generate_stream`). The request's own `parameters` are sampling parameters, as vllm_backend
reads them (a `sampling_parameters` tensor's keys win).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response

from llumnix_backend.requests import RequestError

HEADER_LENGTH = "Inference-Header-Content-Length"
BOOL_INPUTS = ("stream", "exclude_input_in_output", "return_finish_reason", "return_cumulative_logprob",
               "return_logprobs", "return_num_input_tokens", "return_num_output_tokens")
KNOWN_INPUTS = ("text_input", "sampling_parameters", *BOOL_INPUTS)


def decode_tensor(datatype: str, raw: bytes, name: str) -> list[Any]:
    """The elements of a tensor in Triton's raw layout (the HTTP binary extension's, and gRPC's
    `raw_input_contents`)."""
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise RequestError(f"input {name}: a BYTES element is cut short", name)
            (size,) = struct.unpack_from("<I", raw, offset)
            try:
                values.append(raw[offset + 4:offset + 4 + size].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise RequestError(f"input {name}: a BYTES element is not UTF-8 ({exc.reason})", name) from None
            offset += 4 + size
        return values
    if datatype == "BOOL":
        return [bool(b) for b in raw]
    raise RequestError(f"input {name}: datatype {datatype} is not one this model takes (BYTES or BOOL)", name)


def check_input_name(name: Any) -> None:
    if name not in KNOWN_INPUTS:
        raise RequestError(f"unknown input {name!r}; this model takes {', '.join(KNOWN_INPUTS)}", "inputs")


def checked_input(name: str, values: Any) -> Any:
    """The one value of input `name` (shape [1]), of the type the model takes for it."""
    if not isinstance(values, list) or len(values) != 1:
        raise RequestError(f"input {name}: expected one element (shape [1])", name)
    expected = str if name in KNOWN_INPUTS[:2] else bool
    if not isinstance(values[0], expected):
        raise RequestError(f"input {name}: expected {'BYTES' if expected is str else 'BOOL'}", name)
    return values[0]


def encode_tensor(datatype: str, value: Any) -> bytes:
    """One element in Triton's raw layout: BYTES as a 4-byte little-endian length and the bytes."""
    if datatype == "BYTES":
        encoded = value.encode()
        return struct.pack("<I", len(encoded)) + encoded
    if datatype == "FP32":
        return struct.pack("<f", value)
    return struct.pack("<I", value)  # UINT32


@dataclass(frozen=True)
class InferRequest:
    """An infer request as HTTP and gRPC carry it."""

    inputs: dict[str, Any]  # by name (`checked_input`'s values)
    parameters: dict[str, Any] = field(default_factory=dict)  # the request's own, read as sampling parameters
    client_id: str | None = None
    wanted: set[str] = field(default_factory=set)  # the outputs asked for (empty: all)
    binary_out: bool = False  # whether outputs go as binary tensors (HTTP)


# Triton's reserved request parameters: those about the transport (`triton_*` ones such as
# gRPC's `triton_enable_empty_final_response` included), read apart, and those of features this
# server lacks (sequence batching, queue timeouts), refused by name. `priority` goes on with the
# sampling parameters.
_TRANSPORT_PARAMETERS = ("binary_data_output",)
_TRANSPORT_PREFIX = "triton_"
_UNSUPPORTED_PARAMETERS = ("timeout", "sequence_id", "sequence_start", "sequence_end")


def sampling_parameters_of(parameters: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters among an infer request's own parameters."""
    for name in _UNSUPPORTED_PARAMETERS:
        if name in parameters:
            raise RequestError(f"parameters.{name}: Triton's {name} is not supported by this server",
                               f"parameters.{name}")
    return {k: v for k, v in parameters.items()
            if k not in _TRANSPORT_PARAMETERS and not k.startswith(_TRANSPORT_PREFIX)}


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    json_part, binary = (body, b"") if header_length is None else (body[:int(header_length)], body[int(header_length):])
    try:
        request = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise RequestError("an infer request has a list of inputs", "inputs")
    inputs: dict[str, Any] = {}
    offset = 0
    for tensor in request["inputs"]:
        name, datatype = tensor.get("name"), tensor.get("datatype")
        check_input_name(name)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            values = decode_tensor(datatype, binary[offset:offset + size], name)
            offset += size
        else:
            values = tensor.get("data")
            if isinstance(values, list) and values and isinstance(values[0], list):
                values = values[0]
        inputs[name] = checked_input(name, values)
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("an infer request's parameters are an object", "parameters")
    binary_out = bool(parameters.get("binary_data_output")) or any(
        (o.get("parameters") or {}).get("binary_data") for o in request.get("outputs") or [])
    return InferRequest(inputs, sampling_parameters_of(parameters),
                        request.get("id"), {o.get("name") for o in request.get("outputs") or []}, binary_out)


def infer_response(envelope: dict[str, Any], outputs: dict[str, tuple[str, Any]], binary: bool) -> Response:
    """The response with `outputs` (name: (datatype, value)), as JSON or binary tensors."""
    tensors, blobs = [], []
    for name, (datatype, value) in outputs.items():
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [1]}
        if binary:
            raw = encode_tensor(datatype, value)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = [value]
        tensors.append(tensor)
    header = dict(envelope, outputs=tensors)
    if not binary:
        return JSONResponse(header)
    head = json.dumps(header).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})
