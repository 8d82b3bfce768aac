"""The sampling fields both APIs accept, under vLLM's names and with vLLM's meanings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, field_validator

from llumnix_backend.config import PrioritySettings

# Stop strings are matched against the output after every token: bound their number and size.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024

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

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(strings)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in strings):
            raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
        return stop

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
