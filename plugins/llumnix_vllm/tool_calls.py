"""Tool calling on the chat API, by vLLM's own parsers (`vllm.parser`, `vllm.tool_parsers`).

The parsers work on vLLM's `ChatCompletionRequest`, so each chat request that gives tools gets
one, built from the fields tool calling reads. vLLM's parser then decides what `vllm serve`
would: the constraint a tool choice forces on the output (a structural tag or a JSON schema),
the sampling fields it changes, and how the output reads as content and tool calls, whole or
delta by delta.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from pydantic import ValidationError
from vllm.entrypoints.generate.base.protocol import ToolCall
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
from vllm.exceptions import VLLMValidationError
from vllm.parser import ParserManager
from vllm.sampling_params import StructuredOutputsParams
from vllm.tool_parsers import ToolParserManager

from llumnix_backend.config import FrontendSettings
from llumnix_backend.plugin import TOOL_FIELDS, ChatTools, ToolCallReader
from llumnix_backend.requests import RequestError

# vLLM's structured-output constraints, as `StructuredOutputsParams` names them.
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def known_tool_parsers() -> list[str]:
    return sorted(ToolParserManager.list_registered())


@cache
def _parser_class(tool_call_parser: str, enable_auto_tool_choice: bool, tokenizer: Any) -> type:
    return ParserManager.get_parser(tool_parser_name=tool_call_parser, enable_auto_tools=enable_auto_tool_choice,
                                    tokenizer=tokenizer)


def chat_tools(request: Mapping[str, Any], messages: list[dict[str, Any]], constraint: dict[str, Any] | None,
               settings: FrontendSettings, tokenizer: Any, compact_json: bool = False) -> ChatTools:
    """Tool calling for one chat request that gives tools (`request`: its JSON body; `constraint`:
    the structured output it asked for; `compact_json`: the engine's structured outputs allow no
    free whitespace). RequestError for what vLLM would refuse."""
    fields = {key: request[key] for key in TOOL_FIELDS if key in request}  # (all the parsers read)
    try:
        vllm_request = ChatCompletionRequest.model_validate(
            {"model": request.get("model", ""), "messages": messages, **fields,
             "structured_outputs": StructuredOutputsParams(**constraint) if constraint else None})
    except VLLMValidationError as exc:
        raise RequestError(exc.args[0], exc.parameter or "tools") from None
    except ValidationError as exc:  # (a field of the wrong shape)
        first = exc.errors()[0]
        raise RequestError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}", str(first["loc"][0])) from None
    if vllm_request.tool_choice in (None, "none"):
        return _ToolsShown(vllm_request)
    if settings.tool_call_parser is None:
        what = '"auto"' if vllm_request.tool_choice == "auto" else "a tool_choice other than \"none\""
        raise RequestError(f"{what} needs frontend.tool_call_parser in the model's config", "tool_choice")
    if vllm_request.tool_choice == "auto" and not settings.enable_auto_tool_choice:
        raise RequestError('"auto" tool choice needs frontend.enable_auto_tool_choice in the model\'s config',
                           "tool_choice")
    parser_class = _parser_class(settings.tool_call_parser, settings.enable_auto_tool_choice, tokenizer)
    return _ParsedTools(vllm_request, parser_class, tokenizer, settings.enable_auto_tool_choice, compact_json)


class _ToolsShown(ChatTools):
    """Tools given with tool_choice "none": the chat template shows them; the output is text."""

    def __init__(self, vllm_request: ChatCompletionRequest) -> None:
        self._request = vllm_request

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        tools = self._request.tools
        return [tool.model_dump() for tool in tools] if tools else None

    def sampling(self, fields: dict[str, Any]) -> dict[str, Any]:
        return fields

    def reader(self, prompt_token_ids: Sequence[int]) -> ToolCallReader | None:
        return None


class _ParsedTools(_ToolsShown):
    def __init__(self, vllm_request: ChatCompletionRequest, parser_class: type, tokenizer: Any,
                 enable_auto_tools: bool, compact_json: bool) -> None:
        super().__init__(vllm_request)
        self._parser_class, self._tokenizer, self._auto = parser_class, tokenizer, enable_auto_tools
        # What the parser changes on the request (the forced constraint, special tokens kept).
        self._request = self._new_parser().adjust_request(vllm_request)
        forced = self._request.structured_outputs
        if compact_json and forced is not None and forced.structural_tag:
            forced.structural_tag = json.dumps(_without_free_whitespace(json.loads(forced.structural_tag)))

    def _new_parser(self) -> Any:
        return self._parser_class(self._tokenizer, self._request.tools)

    def sampling(self, fields: dict[str, Any]) -> dict[str, Any]:
        fields = dict(fields)
        forced = self._request.structured_outputs
        if forced is not None:
            fields["structured_outputs"] = {k: getattr(forced, k) for k in _CONSTRAINTS
                                            if getattr(forced, k) not in (None, False)}
        if self._request.skip_special_tokens is False:
            fields["skip_special_tokens"] = False
        return fields

    def reader(self, prompt_token_ids: Sequence[int]) -> ToolCallReader:
        return _Reader(self._new_parser(), self._request, self._auto, list(prompt_token_ids))


def _without_free_whitespace(tag: Any) -> Any:
    """A structural tag whose JSON parts allow at most one whitespace character between tokens
    (xgrammar's nearest to none). vLLM applies the engine's `disable_any_whitespace` to JSON
    schemas but not to the JSON inside a tool call's structural tag, where a model may then fill
    the arguments with whitespace and never end."""
    if isinstance(tag, list):
        return [_without_free_whitespace(item) for item in tag]
    if not isinstance(tag, dict):
        return tag
    tag = {key: _without_free_whitespace(value) for key, value in tag.items()}
    if tag.get("type") == "json_schema" and tag.get("style", "json") == "json":
        tag["max_whitespace_cnt"] = 1
    return tag


class _Reader(ToolCallReader):
    """One choice's output as content and tool calls (parsers keep state: one per choice)."""

    def __init__(self, parser: Any, request: ChatCompletionRequest, enable_auto_tools: bool,
                 prompt_token_ids: list[int]) -> None:
        self._parser, self._request, self._auto = parser, request, enable_auto_tools
        self._prompt: list[int] | None = prompt_token_ids  # (the parser reads it once, with the first delta)
        self._called = False

    def whole(self, text: str, token_ids: Sequence[int]) -> dict[str, Any]:
        _, content, calls = self._parser.parse(text, self._request, enable_auto_tools=self._auto,
                                               model_output_token_ids=token_ids)
        calls = maybe_filter_parallel_tool_calls(list(calls or ()), self._request)
        self._called = bool(calls)
        # (a call's own id, where the parser gives one, else a new one)
        tool_calls = [(ToolCall(id=c.id, function=c) if c.id else ToolCall(function=c)).model_dump() for c in calls]
        return {"role": "assistant", "content": content, "tool_calls": tool_calls}

    def delta(self, text: str, token_ids: Sequence[int], finished: bool) -> dict[str, Any] | None:
        delta = self._parser.parse_delta(text, list(token_ids), self._request, self._prompt, finished=finished)
        self._prompt = None
        if delta is None:
            return None
        delta = maybe_filter_parallel_tool_calls(delta, self._request)
        self._called = self._called or bool(delta.tool_calls)
        out = delta.model_dump(exclude_none=True, include={"content", "tool_calls"})
        if not out.get("tool_calls"):
            out.pop("tool_calls", None)
        return out or None

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """As vLLM: "tool_calls" when tools were called by choice ("auto") or by obligation
        ("required", and the output ended normally); a named tool's call ends with "stop"."""
        if self._request.tool_choice == "auto" and self._called:
            return "tool_calls"
        if self._request.tool_choice == "required" and engine_reason == "stop":
            return "tool_calls"
        return engine_reason
