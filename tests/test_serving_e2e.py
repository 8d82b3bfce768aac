"""End to end: a real `llumnix-serve` process with real vLLM CPU engines, over HTTP on 127.0.0.1,
through the `openai` client, `httpx` and `tritonclient`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_KEY, BADLY_NAMED, BROKEN_MODELS
from llumnix_server.launcher import ServerProcess

pytestmark = pytest.mark.engine


def post(server: ServerProcess, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, headers={**server.headers, **(headers or {})}, timeout=60, **kwargs)


def get(server: ServerProcess, path: str) -> httpx.Response:
    return httpx.get(server.url + path, headers=server.headers, timeout=30)


def instances(server: ServerProcess, model: str) -> list[dict]:
    return get(server, f"/v2/llumnix/models/{model}/instances").json()["instances"]


def openai_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


# --- repository -------------------------------------------------------------------------------

def test_repository_serves_good_models_and_explains_broken_ones(serving: ServerProcess) -> None:
    index = {m["name"]: m for m in post(serving, "/v2/repository/index").json()}
    assert index["alpha"]["state"] == "READY"
    assert index["beta"]["state"] == "READY"
    for name, (_, expected) in BROKEN_MODELS.items():
        assert index[name]["state"] == "UNAVAILABLE", name
        reason = index[name]["reason"]
        assert f"{name}/config.yaml" in reason, reason
        assert expected in reason, reason
    assert index[BADLY_NAMED]["state"] == "UNAVAILABLE"
    assert "not a valid model name" in index[BADLY_NAMED]["reason"]
    assert {m.id for m in openai_client(serving).models.list()} == {"alpha", "beta", "embed"}
    assert [i["state"] for i in instances(serving, "alpha")] == ["ready", "ready"]


def test_broken_model_answers_not_ready(serving: ServerProcess) -> None:
    response = post(serving, "/v1/completions", json={"model": "bad-key", "prompt": "hi"})
    assert response.status_code == 503
    assert "colour: unknown key" in response.json()["error"]["message"]
    response = post(serving, "/v2/models/bad-yaml/generate", json={"text_input": "hi"})
    assert response.status_code == 503
    assert get(serving, "/v2/models/bad-yaml/ready").status_code == 503


# --- OpenAI API -------------------------------------------------------------------------------

def test_openai_completion(serving: ServerProcess) -> None:
    result = openai_client(serving).completions.create(
        model="alpha", prompt="The quick brown fox", max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert result.id.startswith("cmpl-")
    assert result.model == "alpha"
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len("The quick brown fox".encode())
    assert result.usage.completion_tokens == 12


def test_openai_chat_streaming_and_not(serving: ServerProcess) -> None:
    client = openai_client(serving)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    full = client.chat.completions.create(
        model="beta", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
    )
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(
        model="beta", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    assert {c.id for c in chunks} == {chunks[0].id}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content  # greedy: the same tokens either way
    assert chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sampling_fields_mean_what_they_mean_in_vllm(serving: ServerProcess) -> None:
    client = openai_client(serving)

    def complete(max_tokens=16, **kw):
        return client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=max_tokens, **kw)

    seeded = [complete(temperature=1.0, seed=7, extra_body={"ignore_eos": True}) for _ in range(2)]
    assert seeded[0].choices[0].text == seeded[1].choices[0].text
    assert complete(temperature=0).choices[0].text == complete(temperature=0).choices[0].text
    short = complete(temperature=0, max_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3
    two = complete(temperature=1.0, seed=3, n=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.usage.completion_tokens == 32
    # min_tokens + ignore_eos: exactly max_tokens however likely EOS is.
    fixed = complete(temperature=1.0, max_tokens=8, extra_body={"min_tokens": 8, "ignore_eos": True})
    assert fixed.usage.completion_tokens == 8


def test_priority_is_accepted_per_request(serving: ServerProcess) -> None:
    for priority in (-5, 0, 5):
        response = post(serving, "/v1/completions", json={
            "model": "alpha", "prompt": "urgent", "max_tokens": 4, "priority": priority,
        })
        assert response.status_code == 200, response.text
    response = post(serving, "/v2/models/alpha/generate", json={
        "text_input": "urgent", "parameters": {"max_tokens": 4, "priority": -3},
    })
    assert response.status_code == 200, response.text


def beta_snapshot(server: ServerProcess) -> dict:
    (instance,) = instances(server, "beta")
    return instance["snapshot"]


def wait_for(server: ServerProcess, predicate, what: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snap = beta_snapshot(server)
        if predicate(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"beta never {what}: {json.dumps(snap)}")
        time.sleep(0.01)


# Enough tokens to keep beta busy for seconds: these requests end when the test ends them.
ENDLESS = 7000


def test_high_priority_requests_are_scheduled_first_inside_the_engine(serving: ServerProcess) -> None:
    """beta runs 2 requests at a time. With both slots taken, queue two ordinary requests and
    then an urgent one; free one slot: vLLM's priority scheduling admits the urgent one.
    Every request is endless, so the engine's state holds still while the test looks."""
    with httpx.Client(base_url=serving.url, headers=serving.headers, timeout=60) as client, \
            ThreadPoolExecutor(max_workers=3) as pool, contextlib.ExitStack() as cleanup:

        def open_stream(name: str, priority: int) -> contextlib.ExitStack:
            """Returns once the request runs (the server answers with its first token)."""
            stream = cleanup.enter_context(contextlib.ExitStack())
            response = stream.enter_context(client.stream("POST", "/v1/completions", json={
                "model": "beta", "prompt": name, "max_tokens": ENDLESS, "ignore_eos": True,
                "priority": priority, "stream": True}))
            lines = response.iter_lines()
            next(lines)
            stream.callback(lines.close)  # dropping the iterator would close the connection early
            return stream

        busy = [open_stream(f"busy-{i}", 5) for i in range(2)]
        wait_for(serving, lambda s: len(s["running"]) == 2, "ran both busy requests")
        normal = [pool.submit(open_stream, f"normal-{i}", 5) for i in range(2)]
        wait_for(serving, lambda s: len(s["waiting"]) == 2, "queued the normal requests")
        urgent = pool.submit(open_stream, "urgent", -5)
        snap = wait_for(serving, lambda s: len(s["waiting"]) == 3, "queued the urgent request")
        assert [r["priority"] for r in snap["waiting"]] == [-5, 5, 5]  # the engine's own order

        busy[0].close()  # that client goes away: its slot frees up
        snap = wait_for(serving, lambda s: any(r["priority"] == -5 for r in s["running"]), "admitted urgent")
        assert [r["priority"] for r in snap["waiting"]] == [5, 5]  # the older requests still wait
        urgent.result().close()
        busy[1].close()
        for future in normal:  # admitted now that both slots are free
            future.result().close()
    wait_for(serving, lambda s: not s["running"] and not s["waiting"], "emptied")


async def _stream_completion(client: httpx.AsyncClient, model: str, max_tokens: int) -> dict:
    body = {
        "model": model, "prompt": f"request for {model} " * random.randint(1, 4), "max_tokens": max_tokens,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.8,
    }
    usage, done, ids = None, False, set()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            ids.add(event["id"])
            if event.get("usage"):
                usage = event["usage"]
    return {"done": done, "usage": usage, "ids": ids, "max_tokens": max_tokens}


def test_32_concurrent_streams_over_two_models(serving: ServerProcess) -> None:
    random.seed(1)
    plan = [("alpha" if i % 2 else "beta", random.randint(8, 40)) for i in range(32)]

    async def run_all():
        async with httpx.AsyncClient(base_url=serving.url, headers=serving.headers, timeout=120) as client:
            return await asyncio.gather(*(_stream_completion(client, m, n) for m, n in plan))

    dispatched_before = _dispatch_counts(serving, "alpha")
    results = asyncio.run(run_all())
    assert all(r["done"] for r in results)
    assert [r["usage"]["completion_tokens"] for r in results] == [n for _, n in plan]
    assert len({next(iter(r["ids"])) for r in results}) == 32
    dispatched = _dispatch_counts(serving, "alpha")
    # The Llumnix dispatcher spread alpha's 16 requests over both of its instances.
    assert all(dispatched[i] - dispatched_before.get(i, 0) >= 4 for i in ("0", "1")), dispatched


def _dispatch_counts(server: ServerProcess, model: str) -> dict[str, float]:
    counts = {}
    for line in get(server, "/metrics").text.splitlines():
        if line.startswith("llumnix:dispatch_decisions_total{") and f'model_name="{model}"' in line:
            instance = line.split('engine="')[1].split('"')[0]
            counts[instance] = float(line.rsplit(" ", 1)[1])
    return counts


def test_disconnected_stream_frees_its_kv_blocks(serving: ServerProcess) -> None:
    body = {"model": "beta", "prompt": "x" * 300, "max_tokens": ENDLESS, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=serving.url, headers=serving.headers, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            request_id = json.loads(next(events)[6:])["id"]
            snap = beta_snapshot(serving)
            assert [r["request_id"] for r in snap["running"]] == [request_id], json.dumps(snap)
            assert snap["running"][0]["num_blocks"] >= 3 and snap["used_blocks"] >= 3, json.dumps(snap)
        # Leaving the block closes the connection mid-stream. Finishing would take 7000 engine
        # steps (several seconds even for this tiny model): freed sooner means aborted.
    snap = wait_for(serving, lambda s: not s["running"] and s["used_blocks"] == 0, "freed the blocks", timeout=3)
    assert snap["waiting"] == []


# --- KServe v2 / Triton -----------------------------------------------------------------------

def test_kserve_generate(serving: ServerProcess) -> None:
    response = post(serving, "/v2/models/alpha/generate", json={
        "text_input": "Hello", "parameters": {"max_tokens": 6, "temperature": 0, "ignore_eos": True},
    })
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "alpha" and body["model_version"] == "1"
    assert body["text_output"].startswith("Hello")
    excluded = post(serving, "/v2/models/alpha/generate", json={
        "text_input": "Hello", "parameters": {"max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                              "exclude_input_in_output": True},
    }).json()
    assert body["text_output"] == "Hello" + excluded["text_output"]


def test_kserve_generate_stream(serving: ServerProcess) -> None:
    body = {"text_input": "Hello", "parameters": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}}
    with httpx.Client(base_url=serving.url, headers=serving.headers, timeout=60) as client:
        with client.stream("POST", "/v2/models/alpha/generate_stream", json=body) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events and all(e["model_name"] == "alpha" for e in events)
    assert events[-1]["finish_reason"] == "length"
    full = post(serving, "/v2/models/alpha/generate", json={
        "text_input": "Hello", "parameters": {**body["parameters"], "exclude_input_in_output": True},
    }).json()
    assert "".join(e["text_output"] for e in events) == full["text_output"]


def test_kserve_requests_with_the_same_id_run_apart(serving: ServerProcess) -> None:
    prompts = ["Hello", "Goodbye and thanks for all the fish"]

    def generate(text: str, request_id: str | None) -> dict:
        body = {"text_input": text, "parameters": {"max_tokens": 40, "temperature": 0, "ignore_eos": True,
                                                   "exclude_input_in_output": True}}
        if request_id is not None:
            body["id"] = request_id
        response = post(serving, "/v2/models/alpha/generate", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(generate, prompts, ["same-id", "same-id"]))
    assert [r["id"] for r in together] == ["same-id", "same-id"]  # the client's id comes back
    alone = [generate(text, None) for text in prompts]
    assert [r["text_output"] for r in together] == [r["text_output"] for r in alone]


def test_tritonclient_health_metadata_readiness_config(serving: ServerProcess) -> None:
    client = triton.InferenceServerClient(url=serving.url.removeprefix("http://"))
    headers = serving.headers
    assert client.is_server_live(headers=headers)
    assert client.is_server_ready(headers=headers)
    assert client.get_server_metadata(headers=headers)["name"] == "llumnix-backend"
    assert client.is_model_ready("alpha", headers=headers)
    assert not client.is_model_ready("bad-key", headers=headers)
    metadata = client.get_model_metadata("alpha", headers=headers)
    assert metadata["name"] == "alpha"
    assert {i["name"] for i in metadata["inputs"]} >= {"text_input"}
    config = client.get_model_config("alpha", headers=headers)
    assert config["backend"] == "vllm"
    assert config["instance_group"][0]["count"] == 2
    index = {m["name"]: m["state"] for m in client.get_model_repository_index(headers=headers)}
    assert index["alpha"] == "READY" and index["bad-yaml"] == "UNAVAILABLE"
    with pytest.raises(triton.InferenceServerException):
        client.get_model_metadata("no-such-model", headers=headers)


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "body", "status", "field", "words"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model", "unknown model"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 9000}, 400, "max_tokens", "maximum context"),
        ("/v1/completions", {"model": "alpha", "prompt": ""}, 400, "prompt", "empty"),
        ("/v1/completions", {"model": "alpha", "prompt": "x" * 4100}, 400, "prompt", "maximum context length"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "priority": 99}, 400, "priority", "between"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "priority": "high"}, 400, "priority", "integer"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "temperature": -1}, 400, "temperature", "non-negative"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model", "required"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
        ("/v1/completions", {"model": "alpha", "prompt": [5, 99999]}, 400, "prompt", "token id 99999 is outside"),
        ("/v1/completions", {"model": "alpha", "prompt": [-1]}, 400, "prompt", "token id -1 is outside"),
        ("/v1/completions", {"model": "alpha", "prompt": [2**40]}, 400, "prompt", "outside the vocabulary"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "seed": 2**70}, 400, "seed", "between"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "logit_bias": {"99999": 5}}, 400, "logit_bias",
         "token id 99999 is outside"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids",
         "empty"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "stop_token_ids": [99999]}, 400, "stop_token_ids",
         "outside the vocabulary"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "bad_words": ["x"] * 20000}, 400, "bad_words",
         "at most 256"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "bad_words": ["x" * 2000]}, 400, "bad_words",
         "longer than 1024 characters"),
        ("/v1/completions", {"model": "alpha", "prompt": "hi", "allowed_token_ids": [3, 99999]}, 400,
         "allowed_token_ids", "token id 99999 is outside"),
        ("/v1/chat/completions", {"model": "alpha", "messages": []}, 400, "messages", "at least 1"),
        ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "bogus", "content": "hi"}]}, 400,
         "messages.0.role", "'user'"),
        ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ],
)
def test_openai_bad_requests_name_the_field(serving, path, body, status, field, words) -> None:
    response = post(serving, path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and words in error["message"], error
    assert error["code"] == status


def test_a_lone_surrogate_in_a_prompt_is_a_400(serving: ServerProcess) -> None:
    # JSON may escape a lone surrogate; no Unicode text can hold it (httpx will not send it as text).
    response = post(serving, "/v1/completions", content=b'{"model": "alpha", "prompt": "a \\ud800 b"}',
                    headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and "cannot be tokenized" in error["message"], error


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"prompt": ["hi"] * 5000}, "prompt", "at most 256"),
        ({"prompt": "hi", "stop": ["x"] * 100_000}, "stop", "at most 64"),
        ({"prompt": "hi", "stop": "x" * 1_000_000}, "stop", "longer than 1024"),
    ],
    ids=["5000-prompts", "100k-stop-strings", "1MB-stop-string"],
)
def test_oversized_lists_and_stop_strings_are_refused_at_once(serving, body, field, words) -> None:
    began = time.monotonic()
    response = post(serving, "/v1/completions", json={"model": "alpha", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and words in error["message"], error
    assert time.monotonic() - began < 30  # refused before any engine work (it used to never answer)


def test_a_body_over_the_size_limit_is_a_413(serving: ServerProcess) -> None:
    huge = {"model": "alpha", "prompt": "x" * (5 << 20), "max_tokens": 2}  # over the default 4 MiB
    for path in ("/v1/completions", "/v2/models/alpha/generate"):
        response = post(serving, path, json=huge)
        assert response.status_code == 413, response.text[:200]
        assert "--max-request-bytes" in response.text


def test_a_prompt_too_long_for_any_tokenizer_is_refused_before_tokenising(serving: ServerProcess) -> None:
    # 3.5 MB of text, under the body limit: no 4,096-token context can hold it, whatever the
    # tokenizer, so it is refused without the seconds tokenising it would take.
    body = {"model": "alpha", "prompt": "hello world, " * 270_000, "max_tokens": 2}
    response = post(serving, "/v1/completions", json=body)
    assert response.status_code == 400
    assert "the prompt has 3,510,000 characters" in response.text and "4096 tokens" in response.text


def test_heavy_prompts_do_not_hold_up_health_checks(serving: ServerProcess) -> None:
    # Just under the character bound: tokenised (on the tokenizer thread), then refused as
    # longer than the context. Sent back to back for 3 s while health checks are timed.
    body = {"model": "alpha", "prompt": "hello world, " * 12_000, "max_tokens": 2}
    until = time.monotonic() + 3

    def flood() -> list[int]:
        codes = []
        while time.monotonic() < until:
            codes.append(post(serving, "/v1/completions", json=body).status_code)
        return codes

    heavy = ThreadPoolExecutor(1).submit(flood)
    waits = []
    while not heavy.done():
        began = time.monotonic()
        assert httpx.get(serving.url + "/v2/health/live", timeout=30).status_code == 200
        waits.append(time.monotonic() - began)
        time.sleep(0.02)
    codes = heavy.result()
    assert codes and set(codes) == {400}
    assert len(waits) >= 5
    assert max(waits) < 1.0, waits  # (benchmarks/input_flood.py measures it: 100 ms is the target)


def test_malformed_json_is_a_400(serving: ServerProcess) -> None:
    for path in ("/v1/completions", "/v2/models/alpha/generate"):
        response = post(serving, path, content=b'{"model": "alpha", "prompt": ',
                        headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert "malformed JSON" in response.text


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v2/models/nope/generate", {"text_input": "hi"}, 404, "unknown model"),
        ("/v2/models/alpha/generate", {"text_input": ""}, 400, "text_input"),
        ("/v2/models/alpha/generate", {"text_input": "hi", "parameters": {"colour": 1}}, 400, "parameters.colour"),
        ("/v2/models/alpha/generate", {"text_input": "hi", "parameters": {"priority": -99}}, 400, "priority"),
        ("/v2/models/alpha/generate", {"text_input": "hi", "parameters": {"max_tokens": 9000}}, 400, "max_tokens"),
        ("/v2/models/alpha/generate", {"parameters": {}}, 400, "text_input"),
    ],
)
def test_kserve_bad_requests(serving, path, body, status, words) -> None:
    response = post(serving, path, json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_api_key_guards_everything_but_health_and_metrics(serving: ServerProcess) -> None:
    for path in ("/v1/models", "/v2/models/alpha", "/v2/llumnix/models/alpha/instances"):
        response = httpx.get(serving.url + path, timeout=10)
        assert response.status_code == 401, path
        wrong = httpx.get(serving.url + path, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert wrong.status_code == 401, path
    assert httpx.get(serving.url + "/v1/models", timeout=10).json()["error"]["type"] == "AuthenticationError"
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        assert httpx.get(serving.url + path, timeout=10).status_code == 200, path


# --- observability ----------------------------------------------------------------------------

def test_instances_endpoint_shows_snapshots(serving: ServerProcess) -> None:
    listed = instances(serving, "alpha")
    assert [i["id"] for i in listed] == ["0", "1"]
    for inst in listed:
        snap = inst["snapshot"]
        assert snap["total_blocks"] > 0 and snap["block_size"] % 32 == 0
        assert inst["freeness"] > 0
    # Snapshots keep coming while the engine idles (heartbeat at least every 100 ms).
    first = instances(serving, "alpha")[0]["snapshot"]["timestamp"]
    time.sleep(0.3)
    assert instances(serving, "alpha")[0]["snapshot"]["timestamp"] > first
    assert get(serving, "/v2/llumnix/models/nope/instances").status_code == 404


def test_sampled_kv_block_residency_reaches_the_metrics(serving: ServerProcess) -> None:
    """`beta` samples every block (`kv_cache_metrics`): prompts of more blocks than it holds,
    each unlike the others, make it evict cached blocks, and their lifetimes are counted."""
    snapshot = instances(serving, "beta")[0]["snapshot"]
    prompt_tokens = 7000
    rng = random.Random(0)
    for _ in range(snapshot["total_blocks"] * snapshot["block_size"] // prompt_tokens + 2):
        prompt = [rng.randrange(3, 250) for _ in range(prompt_tokens)]
        response = post(serving, "/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 1})
        assert response.status_code == 200, response.text
    labels = {"engine": "0", "model_name": "beta"}

    def evictions() -> float:
        families = text_string_to_metric_families(get(serving, "/metrics").text)
        return next((s.value for f in families if f.name == "vllm:kv_block_lifetime_seconds" for s in f.samples
                     if s.name.endswith("_count") and s.labels == labels), 0.0)

    deadline = time.monotonic() + 10  # (the snapshot that carries the count follows the step)
    while evictions() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    # Every prompt beyond what the cache holds evicts its blocks' worth: at least one prompt's.
    assert evictions() >= prompt_tokens // snapshot["block_size"]


def test_metrics_cover_requests_latency_and_instances(serving: ServerProcess) -> None:
    post(serving, "/v1/completions", json={"model": "alpha", "prompt": "metrics", "max_tokens": 4})
    post(serving, "/v1/completions", json={"model": "alpha", "prompt": "metrics", "priority": 99})
    text = get(serving, "/metrics").text
    for needle in (
        'llumnix:requests_total{engine="',
        'outcome="success"',
        'vllm:time_to_first_token_seconds_bucket{engine="',
        "vllm:request_time_per_output_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:request_prefill_time_seconds_count",
        "vllm:request_inference_time_seconds_count",
        "vllm:request_num_preemptions_count",
        "vllm:request_prefill_kv_computed_tokens_count",
        "vllm:request_params_max_tokens_count",
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="alpha",source="local_compute"}',
        'vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="alpha",source="device"}',
        'vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="alpha"}',
        'vllm:cache_config_info{block_size="',
        'vllm:num_requests_running{engine="1",model_name="alpha"}',
        'vllm:num_requests_waiting{engine="0",model_name="beta"}',
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="beta",reason="deferred"} 0.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="alpha"}',
        "# TYPE vllm:num_preemptions_total counter",
        'vllm:request_success_total{engine="',
        'finished_reason="length"',
        'llumnix:instance_freeness{engine="0",model_name="alpha"}',
        'llumnix:instance_state{engine="0",model_name="alpha",state="ready"} 1.0',
        'llumnix:dispatch_decisions_total{engine="0",model_name="alpha",policy="llumnix"}',
        'llumnix:ready_instances{model_name="alpha"} 2.0',
        'outcome="rejected"',
    ):
        assert needle in text, needle


def test_a_prompts_n_choices_count_once_in_vllms_parent_request_metrics(serving: ServerProcess) -> None:
    def totals() -> dict[str, float]:
        lines = get(serving, "/metrics").text.splitlines()
        return {name: sum(float(line.rsplit(" ", 1)[1]) for line in lines
                          if line.startswith(name + "{") and 'model_name="alpha"' in line)
                for name in ("vllm:request_params_n_count", "vllm:request_params_n_sum",
                             "vllm:request_max_num_generation_tokens_sum")}

    before = totals()
    response = post(serving, "/v1/completions", json={"model": "alpha", "prompt": ["a", "b"], "n": 3,
                                                      "max_tokens": 5, "ignore_eos": True})
    assert response.status_code == 200, response.text
    after = totals()
    # Two prompts of three choices: two parent requests, n 3 each, at most 5 tokens each.
    assert after["vllm:request_params_n_count"] - before["vllm:request_params_n_count"] == 2
    assert after["vllm:request_params_n_sum"] - before["vllm:request_params_n_sum"] == 6
    assert after["vllm:request_max_num_generation_tokens_sum"] - before["vllm:request_max_num_generation_tokens_sum"] \
        == 10


def scrape(server: ServerProcess, model: str, engine: str) -> dict[str, float]:
    """The samples of one model and instance in /metrics, by name (labels of their own left out)."""
    wanted = {"model_name": model, "engine": engine}
    return {s.name: s.value for family in text_string_to_metric_families(get(server, "/metrics").text)
            for s in family.samples if s.labels == wanted}


def stream_outputs(server: ServerProcess, body: dict) -> tuple[list[list[int]], int]:
    """A streamed completion's token ids, one list per output that carried any, and its prompt tokens."""
    outputs, usage = [], None
    body = {**body, "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers,
                      timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            usage = event.get("usage") or usage
            outputs += [c["token_ids"] for c in event["choices"] if c.get("token_ids")]
    return outputs, usage["prompt_tokens"]


def test_metrics_count_inter_token_latency_and_prefix_cache_hits(serving: ServerProcess) -> None:
    engine = get(serving, "/v2/models/beta/config").json()["engine"]
    assert engine["enable_prefix_caching"]  # vLLM's default: the repeated prompt must hit
    block = engine["block_size"]
    prompt = ("Prefix cache metrics: the same words again. " * block)[:2 * block + 5]
    body = {"model": "beta", "prompt": prompt, "max_tokens": 8, "ignore_eos": True, "temperature": 0}
    before = scrape(serving, "beta", "0")
    first, n_prompt = stream_outputs(serving, body)
    again, _ = stream_outputs(serving, body)  # on the same instance: beta has one
    after = scrape(serving, "beta", "0")

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert [sum(map(len, o)) for o in (first, again)] == [8, 8]
    # One latency per output after each request's first: 7 each, unless the engine merged outputs.
    assert grew("vllm:inter_token_latency_seconds_count") == len(first) - 1 + len(again) - 1
    # The gaps between a request's outputs add up to its decode time.
    assert grew("vllm:inter_token_latency_seconds_sum") == pytest.approx(grew("vllm:request_decode_time_seconds_sum"))
    assert grew("vllm:request_decode_time_seconds_count") == 2
    assert grew("vllm:request_prompt_tokens_sum") == 2 * n_prompt == grew("vllm:prompt_tokens_total")
    assert grew("vllm:request_generation_tokens_sum") == 16 and grew("vllm:request_generation_tokens_count") == 2
    assert grew("vllm:prefix_cache_queries_total") == 2 * n_prompt
    # The first is new to the cache; the repeat finds every full block but the last token's (recomputed).
    assert grew("vllm:prefix_cache_hits_total") == (n_prompt - 1) // block * block > 0


def test_each_vllm_warning_shows_once_however_many_engines_log_it(serving: ServerProcess) -> None:
    """Every engine process of the three instances warns that vLLM's KV connector API is
    experimental; the server's log has that line once."""
    log = serving.log_path.read_text(errors="replace")
    assert log.count("Initializing KVConnectorBase_V1") == 1, serving.log_tail()
