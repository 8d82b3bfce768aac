"""The sampling fields both APIs accept, under vLLM's names and with vLLM's meanings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from llumnix_backend.config import PrioritySettings

# Request fields that pass to the engine unchanged (vLLM SamplingParams names).
ENGINE_SAMPLING_FIELDS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "min_tokens",
    "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "logit_bias", "allowed_token_ids", "bad_words",
})


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
        return fields

    def priority_or_default(self, settings: PrioritySettings) -> int:
        return settings.default if self.priority is None else self.priority
