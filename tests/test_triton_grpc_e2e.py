"""KServe v2 gRPC through `tritonclient.grpc`, unchanged, against the shared server (its own
free port for `--grpc-port`): health, metadata, config, the repository index, statistics,
`infer()` with the vLLM backend's tensors, and streaming infer as Triton serves a decoupled
vllm_backend model. The same greedy request gives the same text over gRPC as over HTTP."""

from __future__ import annotations

import json
import queue

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import API_KEY
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.engine

AUTH = {"authorization": f"Bearer {API_KEY}"}
SAMPLING = json.dumps({"max_tokens": 8, "temperature": 0, "ignore_eos": True})


@pytest.fixture(scope="module")
def client(serving) -> triton.InferenceServerClient:
    with triton.InferenceServerClient(serving.grpc_url) as c:
        yield c


def tensor(name: str, value) -> triton.InferInput:
    datatype = "BOOL" if isinstance(value, bool) else "BYTES"
    t = triton.InferInput(name, [1], datatype)
    t.set_data_from_numpy(np.array([value], dtype=bool if datatype == "BOOL" else object))
    return t


def inputs(prompt: str, **options) -> list[triton.InferInput]:
    return [tensor("text_input", prompt), tensor("sampling_parameters", SAMPLING),
            *(tensor(name, value) for name, value in options.items())]


def test_health_metadata_config_and_index(client) -> None:
    assert client.is_server_live() and client.is_server_ready()  # open without a key, as on HTTP
    assert client.is_model_ready("alpha")
    assert not client.is_model_ready("no-such-model")
    with pytest.raises(InferenceServerException, match="API key"):
        client.get_server_metadata()
    assert "model_repository" in client.get_server_metadata(headers=AUTH).extensions
    metadata = client.get_model_metadata("alpha", headers=AUTH)
    assert metadata.name == "alpha" and [i.name for i in metadata.inputs][:2] == ["text_input", "stream"]
    config = client.get_model_config("alpha", headers=AUTH).config
    assert config.model_transaction_policy.decoupled and config.instance_group[0].count == 2
    index = {m.name: m for m in client.get_model_repository_index(headers=AUTH).models}
    assert index["alpha"].state == "READY" and index["bad-yaml"].state == "UNAVAILABLE"
    assert "invalid YAML" in index["bad-yaml"].reason
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as refused:
        client.get_model_metadata("nope", headers=AUTH)
    assert refused.value.status() == "StatusCode.NOT_FOUND"


def test_infer_matches_http(client, serving) -> None:
    result = client.infer("alpha", inputs("Hello", exclude_input_in_output=True, return_finish_reason=True,
                                          return_num_output_tokens=True), headers=AUTH)
    text = result.as_numpy("text_output")[0].decode()
    assert result.as_numpy("finish_reason")[0].decode() == "length"
    assert result.as_numpy("num_output_tokens")[0] == 8
    over_http = httpx.post(f"{serving.url}/v2/models/alpha/generate", headers=serving.headers, timeout=60,
                           json={"text_input": "Hello", "parameters": json.loads(SAMPLING)})
    assert over_http.status_code == 200, over_http.text
    assert over_http.json()["text_output"] == "Hello" + text


def test_logprobs_as_vllm_backend_returns_them(client, serving) -> None:
    """`return_logprobs`: per output token, the sampled token and the `logprobs: N` most likely
    ones by token id, with logprob, rank and text; null when the sampling parameters ask for none."""
    sampling = json.dumps({**json.loads(SAMPLING), "logprobs": 2})
    result = client.infer("alpha", [tensor("text_input", "Hello"), tensor("sampling_parameters", sampling),
                                    tensor("exclude_input_in_output", True), tensor("return_logprobs", True)],
                          headers=AUTH)
    positions = json.loads(result.as_numpy("logprobs")[0])
    assert len(positions) == 8
    assert all(1 <= len(p) <= 3 and all(set(c) == {"logprob", "rank", "decoded_token"} for c in p.values())
               for p in positions)
    # Greedy: the most likely token at each position is the one generated there.
    completion = httpx.post(f"{serving.url}/v1/completions", headers=serving.headers, timeout=60,
                            json={"model": "alpha", "prompt": "Hello", "return_token_ids": True,
                                  **json.loads(SAMPLING)}).json()
    firsts = [int(next(i for i, c in p.items() if c["rank"] == 1)) for p in positions]
    assert firsts == completion["choices"][0]["token_ids"]
    assert all(p[str(i)]["logprob"] == max(c["logprob"] for c in p.values()) for p, i in zip(positions, firsts))
    plain = client.infer("alpha", inputs("Hello", return_logprobs=True), headers=AUTH)
    assert plain.as_numpy("logprobs")[0] == b"null"


def test_cumulative_logprob_is_the_sum_of_the_tokens_logprobs(client, serving) -> None:
    """vllm_backend's `return_cumulative_logprob`: over infer, and over a stream, where each
    response carries the sum of every token so far; the same greedy tokens' logprobs as the
    OpenAI API reports them."""
    completion = httpx.post(f"{serving.url}/v1/completions", headers=serving.headers, timeout=60,
                            json={"model": "alpha", "prompt": "Hello", "logprobs": 0, **json.loads(SAMPLING)}).json()
    expected = sum(completion["choices"][0]["logprobs"]["token_logprobs"])
    result = client.infer("alpha", inputs("Hello", return_cumulative_logprob=True), headers=AUTH)
    assert result.as_numpy("cumulative_logprob").dtype == np.float32
    assert float(result.as_numpy("cumulative_logprob")[0]) == pytest.approx(expected, rel=1e-3, abs=1e-3)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=AUTH)
    try:
        client.async_stream_infer("alpha", inputs("Hello", stream=True, return_cumulative_logprob=True,
                                                  return_num_output_tokens=True))
        sums, tokens = [], 0
        while tokens < 8:
            result, error = results.get(timeout=60)
            assert error is None, error
            sums.append(float(result.as_numpy("cumulative_logprob")[0]))
            tokens += int(result.as_numpy("num_output_tokens")[0])
    finally:
        client.stop_stream()
    assert sums == sorted(sums, reverse=True) and sums[-1] == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_infer_errors_name_what_was_wrong(client) -> None:
    with pytest.raises(InferenceServerException, match="unknown input 'colour'") as refused:
        client.infer("alpha", [tensor("text_input", "x"), tensor("colour", "red")], headers=AUTH)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="ModelStreamInfer"):
        client.infer("alpha", inputs("x", stream=True), headers=AUTH)
    with pytest.raises(InferenceServerException, match="sequence_id is not supported"):
        client.infer("alpha", inputs("x"), sequence_id=7, headers=AUTH)


def test_infer_reads_the_requests_own_parameters_as_sampling_parameters(client) -> None:
    """As vllm_backend does when no sampling_parameters tensor comes (typed gRPC parameters)."""
    result = client.infer("alpha", [tensor("text_input", "Hello"), tensor("return_num_output_tokens", True)],
                          parameters={"max_tokens": 3, "temperature": 0.0, "ignore_eos": True}, headers=AUTH)
    assert result.as_numpy("num_output_tokens")[0] == 3


def test_streaming_infer_sends_each_delta_then_the_final_marker(client) -> None:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=AUTH)
    try:
        client.async_stream_infer("alpha", inputs("Hello", stream=True, return_num_output_tokens=True),
                                  enable_empty_final_response=True)
        parts, counts = [], []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                assert not response.outputs
                break
            parts.append(result.as_numpy("text_output")[0].decode())
            counts.append(int(result.as_numpy("num_output_tokens")[0]))
        # num_output_tokens: the tokens each response carries, as vllm_backend counts them.
        assert sum(counts) == 8 and all(c >= 1 for c in counts) and len(parts) > 1
        # A failed request answers in-band; the stream stays open for the next one.
        client.async_stream_infer("no-such-model", inputs("x"))
        _, error = results.get(timeout=60)
        assert "unknown model 'no-such-model'" in str(error)
        # vllm_backend's rule: a streamed response never repeats the prompt.
        client.async_stream_infer("alpha", inputs("x", stream=True, exclude_input_in_output=False))
        _, error = results.get(timeout=60)
        assert "exclude_input_in_output: false is not allowed when streaming" in str(error)
    finally:
        client.stop_stream()
    whole = client.infer("alpha", inputs("Hello", exclude_input_in_output=True), headers=AUTH)
    assert "".join(parts) == whole.as_numpy("text_output")[0].decode()


def test_statistics_count_grpc_requests(client) -> None:
    before = client.get_inference_statistics("alpha", headers=AUTH).model_stats[0].inference_stats.success.count
    client.infer("alpha", inputs("Hi"), headers=AUTH)
    after = client.get_inference_statistics("alpha", headers=AUTH).model_stats[0]
    assert after.inference_stats.success.count == before + 1 and after.inference_stats.success.ns > 0


def test_requests_on_one_stream_run_side_by_side(client) -> None:
    """A short request sent after a long one on the same stream finishes first, as Triton serves
    a decoupled model: the stream does not wait for one request to end before serving the next."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=AUTH)
    long = [tensor("text_input", "Once"), tensor("stream", True),
            tensor("sampling_parameters", json.dumps({"max_tokens": 400, "temperature": 0, "ignore_eos": True}))]
    try:
        client.async_stream_infer("alpha", long, request_id="long", enable_empty_final_response=True)
        client.async_stream_infer("alpha", inputs("Hi", stream=True), request_id="short",
                                  enable_empty_final_response=True)
        finished = []
        while len(finished) < 2:
            result, error = results.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                finished.append(response.id)
        assert finished == ["short", "long"]
    finally:
        client.stop_stream()
