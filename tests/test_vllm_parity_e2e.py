"""Parity with vLLM's own server, through the real clients against the shared server's engines:
structured outputs (enforced by vLLM's structured-output backend; the tiny model's weights are
random, so only the constraint makes its output parse), the fields this server refuses by
name, chat template arguments, vLLM's utility routes, logprobs, `echo` and prompt logprobs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version

import httpx
import jsonschema
import openai
import pytest
import vllm
from llumnix_client import StreamedCompletion, migrate, other, running_on

from llumnix_server.launcher import ServerProcess
from llumnix_server.openai_api import UNSUPPORTED

pytestmark = pytest.mark.engine


def post(server: ServerProcess, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, headers={**server.headers, **(headers or {})}, timeout=60, **kwargs)


def openai_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


def prompt_ids(server: ServerProcess, text: str) -> list[int]:
    return post(server, "/tokenize", json={"model": "alpha", "prompt": text}).json()["tokens"]


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}


def test_a_completion_follows_a_json_schema(serving) -> None:
    result = openai_client(serving).completions.create(
        model="alpha", prompt="A record:", max_tokens=40, temperature=0,
        extra_body={"structured_outputs": {"json": SCHEMA}})
    text = result.choices[0].text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert result.choices[0].finish_reason == "stop"


def test_chat_response_format_json_schema_and_json_object(serving) -> None:
    client = openai_client(serving)
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    result = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "a record"}],
                                            max_tokens=40, temperature=0, response_format=fmt)
    jsonschema.validate(json.loads(result.choices[0].message.content), SCHEMA)
    result = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "json"}],
                                            max_tokens=30, temperature=0, response_format={"type": "json_object"})
    if result.choices[0].finish_reason == "stop":  # (a random object may run past 30 tokens)
        assert isinstance(json.loads(result.choices[0].message.content), dict)
    else:
        assert result.choices[0].message.content.startswith("{")


def test_choice_and_regex_in_every_form(serving) -> None:
    client = openai_client(serving)
    for extra in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        result = client.completions.create(model="alpha", prompt="Yes or no?", max_tokens=5, extra_body=extra)
        assert result.choices[0].text in ("yes", "no"), extra
    result = client.completions.create(model="alpha", prompt="Code:", max_tokens=10,
                                       extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", result.choices[0].text)
    # Triton vllm_backend's key, through KServe generate (whose max_tokens defaults to 16).
    response = post(serving, "/v2/models/alpha/generate",
                    json={"text_input": "Pick:", "parameters": {"guided_decoding": {"choice": ["left", "right"]},
                                                                "exclude_input_in_output": True}})
    assert response.status_code == 200, response.text
    assert response.json()["text_output"] in ("left", "right")
    # vllm_backend's clients send structured_outputs as JSON text.
    response = post(serving, "/v2/models/alpha/generate",
                    json={"text_input": "Pick:", "parameters": {"structured_outputs": json.dumps({"choice": ["up", "down"]}),
                                                                "exclude_input_in_output": True}})
    assert response.status_code == 200, response.text
    assert response.json()["text_output"] in ("up", "down")
    response = post(serving, "/v2/models/alpha/generate", json={"text_input": "Pick:", "parameters": {"lora_name": "x"}})
    assert response.status_code == 400 and "LoRA" in response.text, response.text


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"structured_outputs": {"json": {"type": "objekt"}}}, None, "objekt"),
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs", "not regex and choice"),
    ({"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "response_format", "one constraint"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn", "unknown field"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "schema: missing"),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     "structured_outputs.disable_any_whitespace", "engine.structured_outputs_config"),
])
def test_bad_constraints_are_400s(serving, body, field, words) -> None:
    response = post(serving, "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == field, error


OPENAI_PATHS = (("/v1/completions", {"prompt": "x"}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}))


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_fields_vllm_takes_and_this_server_does_not_are_400s(serving, field) -> None:
    value = {"chat_template": "{{ x }}", "suffix": "end"}.get(field, 7)  # 7: no field's default
    for path, body in OPENAI_PATHS:
        response = post(serving, path, json={"model": "alpha", "max_tokens": 2, field: value, **body})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["param"] == field


@pytest.mark.parametrize(("field", "value"), [
    ("truncate_prompt_tokens", 0), ("thinking_token_budget", 0), ("stream_interval", 0), ("use_beam_search", True),
    ("stream_options", {"include_usage": True}),
])
def test_values_that_ask_for_something_are_400s_even_when_falsy(serving, field, value) -> None:
    """0 is not "not asked" for a field whose default is None (vLLM cuts the prompt to 0 tokens,
    or refuses), and stream_options needs stream: true, as in vLLM."""
    for path, body in OPENAI_PATHS:
        response = post(serving, path, json={"model": "alpha", "max_tokens": 2, field: value, **body})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["param"] == field


def test_a_request_that_spells_out_vllms_defaults_is_served(serving) -> None:
    """Clients that send every field with vLLM's default (0.32's request models) ask for
    nothing this server lacks."""
    defaults = {field: None for field in UNSUPPORTED}
    defaults.update(length_penalty=1.0, include_reasoning=True, mm_payload="tensors", use_beam_search=False,
                    return_token_offsets=False, routed_experts_prompt_start=0, echo=False, stream_options={})
    for path, body in OPENAI_PATHS:
        response = post(serving, path, json={"model": "alpha", "max_tokens": 2, **defaults, **body})
        assert response.status_code == 200, (path, response.text)
    chat = post(serving, "/v1/chat/completions", json={"model": "alpha", "max_tokens": 2, "logprobs": False,
                                                       "top_logprobs": 0, **OPENAI_PATHS[1][1]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["logprobs"] is None, chat.text


def test_a_clients_request_id_names_the_response_as_in_vllm_and_duplicates_are_kept_apart(serving) -> None:
    body = {"model": "alpha", "prompt": "Once upon", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    by_field = post(serving, "/v1/completions", json={**body, "max_tokens": 2, "request_id": "mine"})
    assert by_field.json()["id"] == "cmpl-mine", by_field.text
    by_header = post(serving, "/v1/chat/completions", headers={"X-Request-Id": "from-header"},
                     json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                           "request_id": "from-body"})
    assert by_header.json()["id"] == "chatcmpl-from-header", by_header.text
    embedded = post(serving, "/v1/embeddings", json={"model": "embed", "input": "hi", "request_id": "vec"})
    assert embedded.json()["id"] == "embd-vec", embedded.text
    # Two requests in flight with the same id: each gets its own whole output, both under the id.
    with ThreadPoolExecutor(2) as pool:
        twins = list(pool.map(lambda _: post(serving, "/v1/completions", json={**body, "request_id": "twin"}), range(2)))
    alone = post(serving, "/v1/completions", json=body).json()["choices"][0]["text"]
    for twin in twins:
        assert twin.status_code == 200 and twin.json()["id"] == "cmpl-twin", twin.text
        assert twin.json()["usage"]["completion_tokens"] == 300 and twin.json()["choices"][0]["text"] == alone
    too_long = post(serving, "/v1/completions", json={**body, "request_id": "x" * 300})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "request_id", too_long.text


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(serving) -> None:
    client = openai_client(serving)
    for create, body in ((client.completions.create, {"prompt": "Once upon"}),
                         (client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}]})):
        chunks = list(create(model="alpha", max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True},
                             stream_options={"include_usage": True, "continuous_usage_stats": True}, **body))
        with_tokens = [c for c in chunks if c.choices and c.usage is not None]
        counts = [c.usage.completion_tokens for c in with_tokens]
        assert counts == sorted(counts) and counts[-1] == 5, counts
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in with_tokens)
        assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 5  # and the final usage chunk


def test_add_special_tokens_reaches_the_tokenizer(serving) -> None:
    """The bundled tokenizer has no special tokens to add, so both values give the same ids;
    what is checked is that the field is taken, as vLLM takes it, and tokenises as /tokenize does."""
    for value in (True, False):
        expected = post(serving, "/tokenize", json={"model": "alpha", "prompt": "hello",
                                                    "add_special_tokens": value}).json()["count"]
        response = post(serving, "/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 1,
                                                          "add_special_tokens": value})
        assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == expected
        chat = post(serving, "/v1/chat/completions", json={"model": "alpha", "max_tokens": 1, "add_special_tokens": value,
                                                           "messages": [{"role": "user", "content": "hi"}]})
        tokenized = post(serving, "/tokenize", json={"model": "alpha", "add_special_tokens": value,
                                                     "messages": [{"role": "user", "content": "hi"}]}).json()
        assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == tokenized["count"]


def test_a_structured_output_request_is_not_migrated_and_says_why(serving) -> None:
    run = StreamedCompletion(serving, "alpha", max_tokens=400, ignore_eos=False,
                             structured_outputs={"regex": "[a-z]{400}"}).wait_for_tokens(5)
    source = running_on(serving, run.request_id)
    response = migrate(serving, run.request_id, other(source))
    assert response.status_code == 409, response.text
    assert "structured-output state" in response.text
    run.result()
    assert re.fullmatch("[a-z]+", "".join(run.text))


def test_chat_template_arguments(serving) -> None:
    def prompt_tokens(**extra) -> int:
        response = post(serving, "/v1/chat/completions",
                        json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                              **extra})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    assert prompt_tokens(add_generation_prompt=False) < prompt_tokens()
    response = post(serving, "/v1/chat/completions",
                    json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                          "chat_template_kwargs": {"chat_template": "x"}})
    assert response.status_code == 400 and "chat_template_kwargs.chat_template" in response.text
    assert httpx.codes.is_success(post(serving, "/v1/chat/completions", json={
        "model": "alpha", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "he"}],
        "max_tokens": 1, "add_generation_prompt": False, "continue_final_message": True}).status_code)


def test_vllm_utility_routes(serving) -> None:
    for path in ("/health", "/ping", "/version"):  # open without the API key, as in vLLM
        response = httpx.get(serving.url + path, timeout=30)
        assert response.status_code == 200, path
    assert httpx.post(serving.url + "/ping", timeout=30).status_code == 200
    assert httpx.get(serving.url + "/version", timeout=30).json() == {"version": vllm.__version__,
                                                                      "llumnix_backend": version("llumnix-backend")}
    assert httpx.post(serving.url + "/tokenize", json={"model": "alpha", "prompt": "hi"}, timeout=30).status_code == 401
    tokens = post(serving, "/tokenize", json={"model": "alpha", "prompt": "hello", "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) and tokens["max_model_len"] == 4096
    bare = post(serving, "/tokenize", json={"model": "alpha", "prompt": "hello", "add_special_tokens": False}).json()
    assert bare["count"] <= tokens["count"]  # (the tiny tokenizer adds no special tokens)
    assert post(serving, "/detokenize", json={"model": "alpha", "tokens": bare["tokens"]}).json() == {"prompt": "hello"}
    chat = post(serving, "/tokenize", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 1
    for path, body, field in (("/tokenize", {"model": "alpha"}, "prompt"),
                              ("/detokenize", {"model": "alpha", "tokens": [99999]}, "tokens"),
                              ("/tokenize", {"model": "nope", "prompt": "x"}, "model")):
        response = post(serving, path, json=body)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == field, response.text
    model = post(serving, "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 1})
    assert model.status_code == 200
    assert openai_client(serving).models.retrieve("alpha").id == "alpha"


def test_vllm_bench_serve_runs_against_the_server(serving, tiny_model, tmp_path) -> None:
    """vLLM's own serving benchmark, through `llumnix-bench-serve` (vLLM's CPU build cannot run
    `vllm bench serve` itself)."""
    command = [sys.executable, "-m", "llumnix_server.bench_serve", "--backend", "openai", "--base-url", serving.url,
               "--model", "alpha", "--tokenizer", str(tiny_model), "--dataset-name", "random",
               "--random-input-len", "16", "--random-output-len", "8", "--num-prompts", "4",
               "--ready-check-timeout-sec", "0", "--save-result", "--result-dir", str(tmp_path),
               "--result-filename", "bench.json"]
    done = subprocess.run(command, env={**os.environ, "OPENAI_API_KEY": serving.api_key}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] > 0, result


def test_logprobs_of_completions_and_chat(serving) -> None:
    client = openai_client(serving)
    result = client.completions.create(model="alpha", prompt="Some", max_tokens=6, logprobs=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(max(top.values()) == pytest.approx(lp) for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    chunks = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            logprobs=True, top_logprobs=2, stream=True, extra_body={"ignore_eos": True})
    content = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
               for entry in chunk.choices[0].logprobs.content]
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    plain = client.completions.create(model="alpha", prompt="Some", max_tokens=2)
    assert plain.choices[0].logprobs is None
    response = post(serving, "/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 2, "top_logprobs": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


def test_echo_puts_each_prompt_before_its_completion(serving) -> None:
    client = openai_client(serving)
    greedy = {"model": "alpha", "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(prompt="Once upon", **greedy)
    echoed = client.completions.create(prompt="Once upon", echo=True, **greedy)
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text
    assert echoed.choices[0].logprobs is None
    assert echoed.usage == plain.usage
    chunks = [c.choices[0].text for c in client.completions.create(prompt="Once upon", echo=True, stream=True,
                                                                    **greedy)]
    assert chunks[0].startswith("Once upon") and "".join(chunks) == echoed.choices[0].text
    two = client.completions.create(prompt=["Once upon", "Hello"], echo=True, n=2, **greedy)
    prompts = ["Once upon", "Once upon", "Hello", "Hello"]  # the choices go prompt by prompt, n each
    assert [c.text[:len(p)] for c, p in zip(two.choices, prompts)] == prompts
    # Token ids are echoed as vLLM decodes them: special tokens kept (1 is <s>).
    ids = client.completions.create(prompt=[1, *prompt_ids(serving, "Once upon")], echo=True, **greedy)
    assert ids.choices[0].text.startswith("<s>Once upon")


def test_echo_with_logprobs_covers_the_prompt_then_the_completion(serving) -> None:
    client = openai_client(serving)
    prompt = "Once upon"
    ids = prompt_ids(serving, prompt)
    n_prompt = len(ids)
    greedy = {"model": "alpha", "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2,
              "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**greedy).choices[0].logprobs
    choice = client.completions.create(echo=True, **greedy).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n_prompt + 4
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert "".join(logprobs.tokens[:n_prompt]) == prompt
    assert logprobs.text_offset[:n_prompt + 1] == list(range(n_prompt + 1))  # one character per prompt token
    # The prompt's tokens: the engine's prompt logprobs (which come along, as in vLLM).
    by_id = choice.model_extra["prompt_logprobs"]
    own = [position[str(token_id)]["logprob"] for token_id, position in zip(ids[1:], by_id[1:])]
    assert logprobs.token_logprobs[1:n_prompt] == pytest.approx(own)
    assert all(len(top) == 2 and max(top.values()) >= lp
               for top, lp in zip(logprobs.top_logprobs[1:n_prompt], own))
    # Then the completion's, as without echo.
    assert logprobs.tokens[n_prompt:] == plain.tokens
    assert logprobs.token_logprobs[n_prompt:] == pytest.approx(plain.token_logprobs, abs=1e-4)
    # Streamed: the prompt's in the first chunk, with the first generated token (or more: vLLM merges the outputs
    # of steps a slow reader has not taken yet).
    chunks = [c.choices[0].logprobs for c in client.completions.create(echo=True, stream=True, **greedy)
              if c.choices[0].logprobs]
    assert chunks[0].token_logprobs[0] is None and len(chunks[0].tokens) > n_prompt
    assert [t for chunk in chunks for t in chunk.tokens] == logprobs.tokens


def test_echo_with_max_tokens_0_returns_the_prompt_alone(serving) -> None:
    client = openai_client(serving)
    prompt = "Once upon"
    n_prompt = len(prompt_ids(serving, prompt))
    request = {"model": "alpha", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    choice = client.completions.create(**request).choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == n_prompt and "".join(choice.logprobs.tokens) == prompt
    streamed = list(client.completions.create(**request, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == prompt
    response = post(serving, "/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens", response.text


def test_prompt_logprobs_as_vllm_returns_them(serving) -> None:
    client = openai_client(serving)
    prompt = "The quick brown fox"
    ids = prompt_ids(serving, prompt)
    choice = client.completions.create(model="alpha", prompt=prompt, max_tokens=2,
                                       extra_body={"prompt_logprobs": 3}).choices[0]
    assert choice.logprobs is None
    positions = choice.model_extra["prompt_logprobs"]
    assert len(positions) == len(ids) and positions[0] is None
    for token_id, text, position in zip(ids[1:], prompt[1:], positions[1:]):
        own = position[str(token_id)]
        assert next(iter(position)) == str(token_id)  # the prompt's own token first, as vLLM lists it
        assert own["decoded_token"] == text and own["logprob"] <= 0
        # The 3 most likely, and the prompt's own token if it is not one of them.
        ranked = sorted(position.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked][:3] == [1, 2, 3] and len(position) == (3 if own["rank"] <= 3 else 4)
        assert [e["logprob"] for e in ranked] == sorted((e["logprob"] for e in ranked), reverse=True)
    response = post(serving, "/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 2,
                                                      "stream": True, "prompt_logprobs": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_logprobs"


def test_chat_echoes_the_final_message_and_returns_prompt_logprobs(serving) -> None:
    """As vLLM: `echo` puts the last message before the reply when it has the reply's role (here
    the assistant's, continued); prompt logprobs come once, beside the choices."""
    client = openai_client(serving)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}]
    greedy = {"model": "alpha", "messages": messages, "max_tokens": 4, "temperature": 0}
    continued = {"add_generation_prompt": False, "continue_final_message": True, "ignore_eos": True}
    plain = client.chat.completions.create(extra_body=continued, **greedy)
    echoed = client.chat.completions.create(extra_body={**continued, "echo": True, "prompt_logprobs": 1}, **greedy)
    assert echoed.choices[0].message.content == "Once upon" + plain.choices[0].message.content
    positions = echoed.model_extra["prompt_logprobs"]
    assert positions[0] is None and len(positions) == echoed.usage.prompt_tokens
    assert all(1 <= len(p) <= 2 and all(e["logprob"] <= 0 for e in p.values()) for p in positions[1:])
    # A user message is not the reply's role: nothing is echoed.
    user_last = {"model": "alpha", "messages": messages[:1], "max_tokens": 2, "temperature": 0}
    assert (client.chat.completions.create(extra_body={"echo": True, "ignore_eos": True}, **user_last).choices[0]
            .message.content == client.chat.completions.create(extra_body={"ignore_eos": True}, **user_last)
            .choices[0].message.content)


# strict: the arguments are constrained to the schema too, not only the call's envelope.
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_conversation_with_tool_results_renders_and_tools_show_in_the_prompt(serving) -> None:
    client = openai_client(serving)
    call = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [*WEATHER_QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}]
    plain = client.chat.completions.create(model="alpha", messages=history, max_tokens=1)
    shown = client.chat.completions.create(model="alpha", messages=history, max_tokens=1, tools=[WEATHER_TOOL],
                                           tool_choice="none")
    assert shown.usage.prompt_tokens > plain.usage.prompt_tokens + len("get_weather")
    assert plain.usage.prompt_tokens > len("sunny") + len('{"city": "Paris"}')
    assert shown.choices[0].message.tool_calls in (None, [])


@pytest.mark.parametrize(("choice", "finish_reason"), [
    ({"type": "function", "function": {"name": "get_weather"}}, "stop"), ("required", "tool_calls")])
def test_a_forced_tool_choice_calls_a_tool_with_arguments_of_its_schema(serving, choice, finish_reason) -> None:
    """vLLM's structural tag holds the random model to a Hermes call of a given tool (strict: its
    arguments follow the schema), and vLLM's hermes parser reads it back, whole and streamed."""
    client = openai_client(serving)
    request = {"model": "alpha", "messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "tool_choice": choice,
               "max_tokens": 300, "temperature": 0}
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == finish_reason and not whole.message.content
    called = [(call.function.name, json.loads(call.function.arguments)) for call in whole.message.tool_calls]
    assert called and all(call.id for call in whole.message.tool_calls)  # ("required" may call it more than once)
    assert all(name == "get_weather" and arguments["city"] in ("Paris", "Rome") for name, arguments in called)

    calls: dict[int, dict[str, str]] = {}
    finished = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice_chunk in chunk.choices:
            finished = choice_chunk.finish_reason or finished
            for delta in choice_chunk.delta.tool_calls or ():
                call_so_far = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call_so_far["name"] += delta.function.name or ""
                call_so_far["arguments"] += delta.function.arguments or ""
    assert finished == finish_reason
    # (greedy: the same calls)
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == called


def test_tool_choice_needs_the_model_to_name_a_parser(serving) -> None:
    for choice in ("auto", "required"):
        response = post(serving, "/v1/chat/completions", json={
            "model": "beta", "messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "tool_choice": choice,
            "max_tokens": 2})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "tool_choice" and "frontend.tool_call_parser" in error["message"], error
    response = post(serving, "/v1/chat/completions", json={
        "model": "alpha", "messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "max_tokens": 2,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice", response.text


def test_an_embedding_model_serves_embeddings_as_vllm_does(serving) -> None:
    client = openai_client(serving)
    texts = ["hello world", "Once upon a time", "hello world"]
    response = client.embeddings.create(model="embed", input=texts)
    vectors = [d.embedding for d in response.data]
    assert [d.index for d in response.data] == [0, 1, 2]
    assert all(len(v) == 256 for v in vectors)  # the tiny model's hidden size
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)  # normalised, vLLM's default
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5) and vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert response.usage.prompt_tokens == sum(len(prompt_ids(serving, t)) for t in texts)
    by_ids = client.embeddings.create(model="embed", input=prompt_ids(serving, "hello world")).data[0].embedding
    assert by_ids == pytest.approx(vectors[0], abs=1e-5)
    packed = post(serving, "/v1/embeddings", json={"model": "embed", "input": "hello world",
                                                   "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert list(struct.unpack("<256f", base64.b64decode(packed))) == pytest.approx(vectors[0], abs=1e-6)
    raw = client.embeddings.create(model="embed", input="hello world", extra_body={"use_activation": False})
    assert abs(sum(x * x for x in raw.data[0].embedding) - 1) > 1e-3


def test_unknown_fields_are_ignored_with_a_warning_as_vllm_ignores_them(serving) -> None:
    for path, body in [("/v1/embeddings", {"model": "embed", "input": "x", "colour": "red"}),
                       ("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 1, "flavour": "mint"})]:
        response = post(serving, path, json=body)
        assert response.status_code == 200, response.text
    log = serving.log_tail(200_000)
    assert "/v1/embeddings: the request's fields colour were ignored" in log
    assert "/v1/completions: the request's fields flavour were ignored" in log


def test_embeddings_and_generation_refuse_the_other_kind_of_model(serving) -> None:
    for path, body, field in [
        ("/v1/embeddings", {"model": "alpha", "input": "x"}, "model"),
        ("/v1/completions", {"model": "embed", "prompt": "x", "max_tokens": 2}, "model"),
        ("/v1/embeddings", {"model": "embed", "input": "x", "dimensions": 8}, "dimensions"),
        ("/v1/embeddings", {"model": "embed", "input": [10**6]}, "input"),
        ("/v1/embeddings", {"model": "embed", "input": "x", "truncate_prompt_tokens": 4}, "truncate_prompt_tokens"),
    ]:
        response = post(serving, path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["error"]["param"] == field, response.text
