"""Tool calling as vLLM's own parsers read it (`llumnix_vllm.tool_calls`), on the tiny model's
tokenizer and chat template, without an engine: what a tool choice forces on the engine, and
how an output reads as content and tool calls, whole and streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llumnix_backend.config import FrontendSettings, ModelConfig, ModelSource
from llumnix_backend.requests import RequestError
from llumnix_vllm.tool_calls import chat_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris, and the time?"}]
HERMES = FrontendSettings(tool_call_parser="hermes", enable_auto_tool_choice=True)
TWO_CALLS = ('Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
             '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def tools_for(tokenizer, settings: FrontendSettings = HERMES, **fields):
    return chat_tools({"model": "m", "tools": [WEATHER, CLOCK], **fields}, MESSAGES, None, settings, tokenizer)


def streamed(reader, text: str, piece: int = 5) -> tuple[str, list[dict]]:
    """The content and the tool calls a client assembles from the streamed deltas."""
    content, calls = "", {}
    for start in range(0, len(text), piece):
        delta = reader.delta(text[start:start + piece], [], start + piece >= len(text)) or {}
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            whole = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            whole["name"] += call.get("function", {}).get("name") or ""
            whole["arguments"] += call.get("function", {}).get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


def test_auto_reads_the_calls_in_the_output_whole_and_streamed(tokenizer) -> None:
    tools = tools_for(tokenizer)
    assert tools.sampling({"max_tokens": 9})["skip_special_tokens"] is False  # (as vLLM's hermes)
    reader = tools.reader([1, 2, 3])
    message = reader.whole(TWO_CALLS, [])
    assert message["content"] == "Let me look. "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"] and c["type"] == "function" for c in message["tool_calls"])
    assert reader.finish_reason("stop") == "tool_calls"

    reader = tools.reader([1, 2, 3])
    content, calls = streamed(reader, TWO_CALLS)
    assert content == "Let me look. "
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                        ("get_time", {})]
    assert reader.finish_reason("stop") == "tool_calls"


def test_auto_without_a_call_is_plain_content(tokenizer) -> None:
    reader = tools_for(tokenizer).reader([1])
    message = reader.whole("It is sunny.", [])
    assert message == {"role": "assistant", "content": "It is sunny.", "tool_calls": []}
    assert reader.finish_reason("length") == "length"


def test_required_and_named_choices_force_a_constraint(tokenizer) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        forced = tools_for(tokenizer, tool_choice=choice).sampling({"max_tokens": 9})["structured_outputs"]
        tag = json.loads(forced["structural_tag"])  # vLLM's strict tool calling: an xgrammar structural tag
        assert "get_weather" in json.dumps(tag)
    named = tools_for(tokenizer, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_weather" not in named.sampling({})["structured_outputs"]["structural_tag"]
    reader = tools_for(tokenizer, tool_choice="required").reader([1])
    reader.whole(TWO_CALLS, [])
    assert reader.finish_reason("stop") == "tool_calls"
    assert reader.finish_reason("length") == "length"  # (cut short: not a completed call)


def json_parts(tag):
    if isinstance(tag, list):
        return [part for item in tag for part in json_parts(item)]
    if not isinstance(tag, dict):
        return []
    own = [tag] if tag.get("type") == "json_schema" else []
    return own + [part for value in tag.values() for part in json_parts(value)]


def test_an_engine_without_free_json_whitespace_bounds_it_in_forced_calls(tokenizer) -> None:
    """vLLM leaves whitespace free in a structural tag's JSON whatever the engine's
    disable_any_whitespace says; the random model would fill a call's arguments with it."""
    choice = {"tool_choice": "required"}
    free = json_parts(json.loads(tools_for(tokenizer, **choice).sampling({})["structured_outputs"]["structural_tag"]))
    compact = chat_tools({"model": "m", "tools": [WEATHER, CLOCK], **choice}, MESSAGES, None, HERMES, tokenizer,
                         compact_json=True)
    bounded = json_parts(json.loads(compact.sampling({})["structured_outputs"]["structural_tag"]))
    assert free and all(part.get("max_whitespace_cnt") is None for part in free)
    assert len(bounded) == len(free) and all(part["max_whitespace_cnt"] == 1 for part in bounded)


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer) -> None:
    reader = tools_for(tokenizer, parallel_tool_calls=False).reader([1])
    assert [c["function"]["name"] for c in reader.whole(TWO_CALLS, [])["tool_calls"]] == ["get_weather"]
    _, calls = streamed(tools_for(tokenizer, parallel_tool_calls=False).reader([1]), TWO_CALLS)
    assert [c["name"] for c in calls] == ["get_weather"]


def test_tool_choice_none_shows_the_tools_and_reads_nothing(tokenizer) -> None:
    tools = tools_for(tokenizer, tool_choice="none")
    assert [t["function"]["name"] for t in tools.template_tools] == ["get_weather", "get_time"]
    assert tools.reader([1]) is None and tools.sampling({"max_tokens": 3}) == {"max_tokens": 3}
    shown = tokenizer.apply_chat_template(MESSAGES, tools=tools.template_tools, tokenize=False)
    assert "get_weather" in shown and "<tool_call>" in shown


@pytest.mark.parametrize(("fields", "settings", "param", "words"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, HERMES, "tool_choice", "does not match"),
    ({"tool_choice": "sometimes"}, HERMES, "tool_choice", "sometimes"),
    ({"tool_choice": "auto"}, FrontendSettings(), "tool_choice", "frontend.tool_call_parser"),
    ({"tool_choice": "required"}, FrontendSettings(), "tool_choice", "frontend.tool_call_parser"),
    ({"tool_choice": "auto"}, FrontendSettings(tool_call_parser="hermes"), "tool_choice", "enable_auto_tool_choice"),
])
def test_what_vllm_refuses_is_a_request_error_naming_the_field(tokenizer, fields, settings, param, words) -> None:
    with pytest.raises(RequestError) as refused:
        tools_for(tokenizer, settings, **fields)
    assert refused.value.field == param and words in str(refused.value), (refused.value.field, str(refused.value))


@pytest.mark.parametrize(("fields", "param"), [({"tools": []}, "tools"), ({"tools": [{"type": "function"}]}, "tools"),
                                               ({"tools": [WEATHER], "parallel_tool_calls": "x"}, "parallel_tool_calls")])
def test_malformed_tools_are_request_errors(fields, param) -> None:
    with pytest.raises(RequestError) as refused:
        chat_tools({"model": "m", **fields}, MESSAGES, None, HERMES, None)
    assert refused.value.field == param, str(refused.value)


def test_frontend_settings_change_no_engine() -> None:
    def source(**frontend) -> ModelSource:
        return ModelSource(ModelConfig(engine={"model": "m"}, frontend=frontend), "c", "c", Path("."))

    assert source().same_engine(source(tool_call_parser="hermes", enable_auto_tool_choice=True))
    with pytest.raises(ValueError, match="enable_auto_tool_choice needs tool_call_parser"):
        FrontendSettings(enable_auto_tool_choice=True)
