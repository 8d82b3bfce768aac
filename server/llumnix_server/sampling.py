"""The sampling fields both APIs accept, under vLLM's names and with vLLM's meanings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llumnix_backend.config import PrioritySettings
from llumnix_backend.requests import RequestError


def finite_logprob(logprob: float) -> float:
    return max(logprob, -9999.0)  # as vLLM writes -inf: JSON has no infinity


# Request fields that pass to the engine unchanged (vLLM SamplingParams names).
ENGINE_SAMPLING_FIELDS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "min_tokens",
    "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "logit_bias", "allowed_token_ids", "bad_words",
})


# The constraints of vLLM's structured outputs, of which a request gives one.
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# vLLM's earlier request fields for them, and what each became.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


class StructuredOutputs(BaseModel):
    """vLLM's `StructuredOutputsParams`, as its server takes them: one constraint, and options.
    The engine compiles and enforces it (xgrammar, guidance or outlines)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # vLLM's request fields for these options, which its structured-output backends read from
    # the engine's settings instead: refused here rather than silently ignored.
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None

    def engine_fields(self) -> dict[str, Any]:
        for option in ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"):
            if getattr(self, option) is not None:
                raise RequestError(f"structured_outputs.{option}: vLLM takes it from the engine's settings, not from "
                                   "a request (set engine.structured_outputs_config in the model's config)",
                                   f"structured_outputs.{option}")
        return self.model_dump(by_alias=True, exclude_none=True)


def structured_outputs(constraint: dict[str, Any], field: str) -> dict[str, Any] | None:
    """The engine's `structured_outputs` from the fields a request gave (`field` names them in
    errors): None without a constraint; a RequestError for more than one."""
    kinds = [k for k in CONSTRAINTS if constraint.get(k) not in (None, False)]
    if len(kinds) > 1:
        raise RequestError(f"{field}: give one constraint, not {' and '.join(kinds)}", field)
    return constraint if kinds else None


class SamplingFields(BaseModel):
    """None means "not given": the model's defaults (its generation config) or vLLM's apply."""

    priority: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def sampling(self, defaults: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
        """The engine's sampling fields: the model's defaults, overridden by what was given.
        `max_tokens=None` lets the request use the rest of the model's context."""
        fields = dict(defaults)
        for name, value in self:
            if name in ENGINE_SAMPLING_FIELDS and value is not None:
                fields[name] = value
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        else:
            fields.setdefault("max_tokens", None)
        constraint = structured_outputs(self.constraint_fields(), "structured_outputs")
        if constraint is not None:
            fields["structured_outputs"] = constraint
        return fields

    def constraint_fields(self) -> dict[str, Any]:
        """The structured-output fields given, under vLLM's `StructuredOutputsParams` names."""
        given = self.structured_outputs.engine_fields() if self.structured_outputs else {}
        for name, key in GUIDED_FIELDS.items():
            if getattr(self, name) is not None:
                given[key] = getattr(self, name)
        return given

    def priority_or_default(self, settings: PrioritySettings) -> int:
        return settings.default if self.priority is None else self.priority
