"""The request and output types that pass between the HTTP front end, a model and its backend.

They carry no engine types: `sampling` holds sampling fields under the names vLLM's
`SamplingParams` uses (the OpenAI and KServe layers map their fields onto these), and a
backend turns them into its engine's own parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llumnix_backend.config import RequestLimits


class RequestError(ValueError):
    """The request is invalid; the message names the field and why (HTTP 400)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def check_limits(sampling: Mapping[str, Any], limits: RequestLimits) -> None:
    """Raise `RequestError` naming the field if the sampling fields ask for more than the
    model's `frontend.limits` allow."""
    stop = sampling.get("stop")
    _check_strings("stop", [stop] if isinstance(stop, str) else stop or [], limits, "max_stop_strings",
                   "max_stop_chars")
    _check_strings("bad_words", sampling.get("bad_words") or [], limits, "max_bad_words", "max_bad_word_chars")
    for field_name in ("allowed_token_ids", "stop_token_ids", "logit_bias"):
        entries = len(sampling.get(field_name) or ())
        if entries > limits.max_token_list:
            raise RequestError(f"{field_name} has {entries} entries; at most {limits.max_token_list} are allowed "
                               "(frontend.limits.max_token_list)", field_name)


def _check_strings(field_name: str, strings: list[str], limits: RequestLimits, count: str, chars: str) -> None:
    most, most_chars = getattr(limits, count), getattr(limits, chars)
    if len(strings) > most:
        raise RequestError(f"{field_name} has {len(strings)} strings; at most {most} are allowed "
                           f"(frontend.limits.{count})", field_name)
    if any(len(s) > most_chars for s in strings):
        raise RequestError(f"{field_name}: a string is longer than {most_chars} characters "
                           f"(frontend.limits.{chars})", field_name)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    arrival_time: float = 0.0  # time.monotonic() when the server received it
    # A migrated request's KV cache, as the backend handed it over (a `KvTransfer`): all of
    # `prompt_token_ids` but the last token have their KV there, so the engine skips them.
    kv_transfer: Any = None

    @property
    def max_tokens(self) -> int | None:
        return self.sampling.get("max_tokens")

    @property
    def bound_to_its_engine(self) -> str | None:
        """Why the request cannot continue on another instance with the same output, or None.
        A structured-output request's grammar state, and a seeded sampler's random stream,
        live in its engine and would start over elsewhere."""
        if self.sampling.get("structured_outputs"):
            return "its structured-output state lives in its engine"
        if self.sampling.get("seed") is not None and self.sampling.get("temperature", 1.0) != 0:
            return "its seeded random sampling lives in its engine"
        return None

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether an engine may take the prompt's KV from its prefix cache: not for prompt
        logprobs, which need every prompt position computed (vLLM skips the lookup then)."""
        return self.sampling.get("prompt_logprobs") is None

    def continued(self, token_ids: tuple[int, ...], kv_transfer: Any = None) -> GenerationRequest:
        """The request as another instance takes it over with `token_ids` (its prompt and
        everything generated so far) as the prompt: the sampling budget left, and the KV of
        those tokens in `kv_transfer` (a migration) or none (a replay: recomputed)."""
        generated = len(token_ids) - len(self.prompt_token_ids)
        sampling = dict(self.sampling)
        if sampling.get("max_tokens") is not None:
            sampling["max_tokens"] -= generated
        if sampling.get("min_tokens"):
            sampling["min_tokens"] = max(0, sampling["min_tokens"] - generated)
        if generated:
            # The prompt's logprobs came with the first generated token: the instance taking
            # over must not send them again (nor those of its longer prompt).
            sampling.pop("prompt_logprobs", None)
        return replace(self, prompt_token_ids=tuple(token_ids), sampling=sampling, kv_transfer=kv_transfer)


@dataclass(frozen=True)
class EmbeddingRequest:
    """One input of an embeddings call, for a model whose engine runs a pooling task: a single
    pass over the prompt, nothing generated (nor migrated: it is done within one engine step)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    priority: int = 0
    dimensions: int | None = None  # a matryoshka model's shorter embedding
    use_activation: bool | None = None  # normalise (the pooler's default: None)


@dataclass(frozen=True)
class RankedLogprob:
    """A token the engine reports at a position of the prompt or the output, as vLLM's `Logprob`
    with its token id."""

    token_id: int
    token: str  # its text, as the detokenizer wrote it
    logprob: float
    rank: int  # 1: the most likely token there


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's (or an echoed prompt token's) log probability, and the most likely
    tokens at its position."""

    token: str  # the token's text, as the detokenizer wrote it
    logprob: float | None  # None only for an echoed prompt's first token: nothing precedes it
    top: tuple[tuple[str, float], ...] = ()  # (token text, logprob), most likely first
    # The sampled token and the most likely ones, with their ids and ranks, as vLLM lists them.
    ranked: tuple[RankedLogprob, ...] = ()


# vLLM's prompt logprobs: per prompt token, None for the first (nothing precedes it), else the
# prompt's own token followed by the most likely ones at its position, as vLLM lists them.
PromptLogprobs = tuple[tuple[RankedLogprob, ...] | None, ...]


@dataclass(frozen=True)
class GenerationDelta:
    """What one engine step added to a request's output."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None  # "stop", "length", "abort"; None while generating
    stop_reason: int | str | None = None
    # Seconds the request waited in the engine's queue before it was first scheduled, on its
    # first delta with tokens if the backend knows.
    queue_time: float | None = None
    # Seconds from then to its first token (its prefill), on the same delta if the backend knows.
    prefill_time: float | None = None
    # Prompt tokens whose KV the engine did not compute (prefix cache, migrated KV), if known.
    num_cached_tokens: int | None = None
    # Times this engine has preempted the request so far, if the backend knows.
    num_preemptions: int | None = None
    # One per token of `token_ids`, when the request asked for logprobs (sampling "logprobs").
    logprobs: tuple[TokenLogprob, ...] | None = None
    # One per prompt token, on the delta with the first generated token (the prefill's end),
    # when the request asked for them (sampling "prompt_logprobs").
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
