"""Triton parity through `tritonclient.http`, unchanged, against the shared server: `infer()`
with the vLLM backend's BYTES and BOOL tensors (binary and JSON), the versioned routes, and
statistics with real counts."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from conftest import API_KEY
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.engine



def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}  # a new dict each call: tritonclient adds to it


def client(serving) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(serving.url.removeprefix("http://"), network_timeout=60)


def tensor(name: str, value, binary: bool = True) -> triton.InferInput:
    datatype = "BOOL" if isinstance(value, bool) else "BYTES"
    data = np.array([value], dtype=bool if datatype == "BOOL" else object)
    t = triton.InferInput(name, [1], datatype)
    t.set_data_from_numpy(data, binary_data=binary)
    return t


def infer(serving, prompt: str, binary: bool = True, **options) -> triton.InferResult:
    inputs = [tensor("text_input", prompt, binary),
              tensor("sampling_parameters", json.dumps({"max_tokens": 8, "temperature": 0, "ignore_eos": True}), binary)]
    inputs += [tensor(name, value, binary) for name, value in options.items()]
    return client(serving).infer("alpha", inputs, headers=auth())


def test_infer_with_the_vllm_backend_tensors(serving) -> None:
    result = infer(serving, "Hello", exclude_input_in_output=True, return_finish_reason=True,
                   return_num_input_tokens=True, return_num_output_tokens=True)
    text = result.as_numpy("text_output")[0].decode()  # (random weights: often split characters)
    assert result.as_numpy("finish_reason")[0].decode() == "length"
    assert result.as_numpy("num_output_tokens")[0] == 8
    assert result.as_numpy("num_input_tokens")[0] > 0
    # JSON tensors give the same greedy text, the prompt included by default.
    again = infer(serving, "Hello", binary=False)
    assert again.as_numpy("text_output")[0].decode() == "Hello" + text
    assert again.get_output("finish_reason") is None  # not asked for


def test_infer_refuses_what_it_cannot_do(serving) -> None:
    with pytest.raises(InferenceServerException, match="streaming needs generate_stream"):
        infer(serving, "Hello", stream=True)
    with pytest.raises(InferenceServerException, match="unknown input 'colour'"):
        client(serving).infer("alpha", [tensor("text_input", "x"), tensor("colour", "red")], headers=auth())


def test_infer_reads_the_requests_own_parameters_as_sampling_parameters(serving) -> None:
    """As vllm_backend does when no sampling_parameters tensor comes; Triton's own request
    parameters this server lacks are refused by name."""
    c = client(serving)
    asked = [tensor("text_input", "Hello"), tensor("return_num_output_tokens", True)]
    result = c.infer("alpha", asked, parameters={"max_tokens": 3, "temperature": 0, "ignore_eos": True},
                     headers=auth())
    assert result.as_numpy("num_output_tokens")[0] == 3
    # The tensor's keys win over the request's.
    both = c.infer("alpha", [*asked, tensor("sampling_parameters", json.dumps({"max_tokens": 5, "ignore_eos": True}))],
                   parameters={"max_tokens": 3}, headers=auth())
    assert both.as_numpy("num_output_tokens")[0] == 5
    with pytest.raises(InferenceServerException, match="parameters.colour: unknown field"):
        c.infer("alpha", asked, parameters={"colour": "red"}, headers=auth())
    with pytest.raises(InferenceServerException, match="timeout is not supported"):
        c.infer("alpha", asked, timeout=1000, headers=auth())


def test_versioned_routes_answer_for_the_served_version_only(serving) -> None:
    c = client(serving)
    assert c.is_model_ready("alpha", "1", headers=auth())
    assert c.get_model_metadata("alpha", "1", headers=auth())["name"] == "alpha"
    assert c.get_model_config("alpha", "1", headers=auth())["name"] == "alpha"
    result = c.infer("alpha", [tensor("text_input", "Hi")], model_version="1", headers=auth())
    assert result.as_numpy("text_output")[0].decode().startswith("Hi")
    response = httpx.post(f"{serving.url}/v2/models/alpha/versions/7/generate", headers=auth(), timeout=30,
                          json={"text_input": "x"})
    assert response.status_code == 404 and "no version '7'" in response.text


def test_statistics_count_requests(serving) -> None:
    c = client(serving)

    def counts() -> tuple[int, int]:
        (stats,) = c.get_inference_statistics("alpha", headers=auth())["model_stats"]
        return stats["inference_stats"]["success"]["count"], stats["inference_count"]

    before = counts()
    for _ in range(3):
        infer(serving, "Count me")
    after = counts()
    assert after[0] - before[0] == 3 and after[1] - before[1] == 3
    (stats,) = c.get_inference_statistics("alpha", headers=auth())["model_stats"]
    assert stats["version"] == "1" and stats["last_inference"] > 0 and stats["inference_stats"]["success"]["ns"] > 0
    names = {s["name"] for s in c.get_inference_statistics(headers=auth())["model_stats"]}
    assert {"alpha", "beta"} <= names


def test_sixteen_tokens_unless_told_otherwise_as_in_vllm_backend(serving) -> None:
    inputs = [tensor("text_input", "Go on"), tensor("sampling_parameters", json.dumps({"ignore_eos": True})),
              tensor("return_num_output_tokens", True)]
    result = client(serving).infer("alpha", inputs, headers=auth())
    assert result.as_numpy("num_output_tokens")[0] == 16
