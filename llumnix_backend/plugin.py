"""The backend plugin API: what the core needs from an engine, and how plugins are found.

A backend is registered under the entry-point group `llumnix_backend.backends`; its name is
what a model's config puts in `backend:`. The core never imports an engine: it talks to
`ModelRuntime` (one per served model: tokenizer, request checks, instance factory) and
`EngineInstance` (one engine process each).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from llumnix_backend.config import ConfigError, FrontendSettings, ModelSource
from llumnix_backend.gpus import GpuDevice
from llumnix_backend.policies.placement import GpuPlacement
from llumnix_backend.requests import EmbeddingRequest, GenerationDelta, GenerationRequest, RequestError
from llumnix_backend.snapshot import InstanceSnapshot

ENTRY_POINT_GROUP = "llumnix_backend.backends"
# The chat request fields of tool calling (OpenAI's names).
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


class InstanceState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineDead(RuntimeError):
    """The engine behind an instance stopped working; its requests cannot continue there."""


class EngineStartFailed(RuntimeError):
    """An engine did not start; the message is the engine's own account of why."""


@dataclass(frozen=True)
class KvExport:
    """What an engine reports after copying a request's KV blocks into a transfer."""

    token_ids: tuple[int, ...]  # prompt + generated so far; all but the last have KV
    blocks: int  # block positions of the request the transfer now holds (from 0)


@dataclass(frozen=True)
class NotExported:
    """An export's answer when the request is not decoding on the engine now; `reason` says
    what it is doing instead (finished, preempted, in prefill, not scheduled last step)."""

    reason: str


@dataclass(frozen=True)
class DetokenizedText:
    """What a batch of generated tokens adds to a request's text."""

    text: str  # the text to show now (text that could still turn out to start a stop string waits)
    kept: int  # how many of the batch's tokens belong to the output (fewer after a stop string)
    stop: str | None = None  # the stop string that ended the output in this batch, if one did


# An engine's deltas in, in order (their token ids, and how the engine finished the request:
# a stop token's text is left out as the engine leaves it out); their text out.
Detokenizer = Callable[[GenerationDelta], DetokenizedText]


class KvTransfer(abc.ABC):
    """Where one migration's KV blocks travel from source to destination (shared memory on
    one host, say). The front end creates it and closes it once the migration has ended."""

    # How much a stage copies per engine step unless the model's settings say otherwise: as
    # much as the path moves in a small fraction of a decode step.
    default_stage_chunk_mib: float = 64
    # The path the blocks take ("host", "device", "network"), as migration reports show it.
    route: str = "host"

    @abc.abstractmethod
    def close(self) -> None: ...


class EngineInstance(abc.ABC):
    """One engine (its own OS process) serving one model."""

    instance_id: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine and return once it serves; raise with the engine's error if not."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream the request's output. Closing the iterator early aborts the request in the
        engine (its KV blocks are freed)."""

    async def embed(self, request: EmbeddingRequest) -> list[float]:
        """The prompt's embedding, for a model whose runtime `embeds`. Raise `RequestError` for
        what the engine refuses and `EngineDead` if the engine is lost meanwhile."""
        raise NotImplementedError(f"{type(self).__name__} serves no embeddings")

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """End the request now: its stream finishes with finish_reason "abort"."""

    @abc.abstractmethod
    async def export_kv(self, request_id: str, transfer: KvTransfer, first_block: int,
                        max_blocks: int | None = None) -> KvExport | NotExported:
        """Between two engine steps, copy the full KV blocks of a decoding request from position
        `first_block` on into `transfer`, at most `max_blocks` of them; `NotExported` if the
        request is not decoding here. The request keeps running."""

    @abc.abstractmethod
    async def stop_and_export_kv(self, request_id: str, transfer: KvTransfer,
                                 first_block: int) -> KvExport | NotExported:
        """The final stage: between two engine steps, stop decoding the request here and copy
        the rest of its KV blocks, the one still being written included. The request keeps its
        blocks, unscheduled, until `resume_request` or its abort. `NotExported` (and nothing
        stopped) if it is not decoding here."""

    @abc.abstractmethod
    async def resume_request(self, request_id: str) -> None:
        """Decode a request stopped by `stop_and_export_kv` again (a migration gave up)."""

    @property
    @abc.abstractmethod
    def latest_snapshot(self) -> InstanceSnapshot | None:
        """The newest load snapshot the engine reported, or None before the first."""

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """False once the engine process has died or failed, or the engine was abandoned."""

    @property
    @abc.abstractmethod
    def last_report_at(self) -> float | None:
        """When (`time.monotonic()` in this process) the newest load snapshot arrived; the
        engine reports at least every heartbeat, so a stale time means a hung engine."""

    @property
    def failure(self) -> str | None:
        """The engine's own account of why it is not alive (an exit signal, say), if known."""
        return None

    @property
    def node(self) -> str | None:
        """The cluster node the engine runs on, once started; None on a single host."""
        return None

    @property
    def start_phase(self) -> str | None:
        """While `start` runs: what it is doing or waiting for, in a few words (None: not known)."""
        return None

    @abc.abstractmethod
    def abandon(self, reason: str) -> None:
        """Give the engine up (hung, or dead): every request streaming from it ends at once with
        `EngineDead(reason)`, and it takes no new ones. `shutdown` still stops it."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and everything it started."""


class ToolCallReader(abc.ABC):
    """One chat choice's output read as an assistant message of content and tool calls, in
    OpenAI's chat shape (`{"role", "content", "tool_calls"}`); a reader keeps state, so each
    choice has its own."""

    @abc.abstractmethod
    def whole(self, text: str, token_ids: Sequence[int]) -> dict[str, Any]:
        """The message of a finished choice."""

    @abc.abstractmethod
    def delta(self, text: str, token_ids: Sequence[int], finished: bool) -> dict[str, Any] | None:
        """What this piece of a streamed choice adds (`content` and/or `tool_calls` deltas);
        None while it adds nothing yet (a tool call's opening tag, say)."""

    @abc.abstractmethod
    def finish_reason(self, engine_reason: str | None) -> str | None:
        """The choice's finish reason once read ("tool_calls" where tools were called)."""


class ChatTools(abc.ABC):
    """One chat request's tools, handled as the backend's own server handles them."""

    @property
    @abc.abstractmethod
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template renders into the prompt."""

    @abc.abstractmethod
    def sampling(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The engine's sampling fields with what the tool choice forces (an output constraint)."""

    @abc.abstractmethod
    def reader(self, prompt_token_ids: Sequence[int]) -> ToolCallReader | None:
        """A reader for one choice's output; None when the output is plain text."""


class ModelRuntime(abc.ABC):
    """A backend's view of one model: shared by all of the model's instances."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completion prompt (with the tokenizer's special tokens unless told
        not to); raise `RequestError` for text the tokenizer cannot take."""

    @property
    def vocab_size(self) -> int | None:
        """Token ids are below this (None: not known, not checked)."""
        return None

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of these token ids, special tokens left out unless told otherwise."""

    @abc.abstractmethod
    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token id's vocabulary entry."""

    @abc.abstractmethod
    def render_chat(self, messages: list[dict[str, Any]], add_special_tokens: bool = False,
                    chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        """Token ids of a chat conversation rendered by `chat_template` (the model config's
        `frontend.chat_template`), else the tokenizer's own (with the tokenizer's special tokens
        added on top when asked: the template has its own)."""

    def chat_tools(self, request: Mapping[str, Any], messages: list[dict[str, Any]],
                   constraint: dict[str, Any] | None, settings: FrontendSettings) -> ChatTools:
        """Tool calling for a chat request that gives tool fields (`request`: its JSON body;
        `messages`: as the chat template takes them; `constraint`: the structured output it
        asked for). Raise `RequestError` naming the field for what cannot be served."""
        raise RequestError("tools are not supported by this model's backend", "tools")

    @abc.abstractmethod
    def new_detokenizer(self, prompt_token_ids: Sequence[int], sampling: Mapping[str, Any]) -> Detokenizer:
        """A detokenizer for a request with this prompt and sampling: give it the generated
        token ids in order, it returns the text each batch adds and the stop string that ends
        the output, exactly as the engine's own would."""

    @property
    def embeds(self) -> bool:
        """Whether the engine runs an embedding (pooling) task instead of generating text."""
        return False

    def check_embedding(self, request: EmbeddingRequest) -> None:
        """Raise `RequestError` naming the field if the engine would reject this embedding request."""

    @abc.abstractmethod
    def check_sampling(self, sampling: Mapping[str, Any]) -> None:
        """Raise `RequestError` naming the field if the engine would reject these settings."""

    def default_sampling(self) -> dict[str, Any]:
        """Sampling defaults the model ships (e.g. its generation config), under vLLM's names;
        a request's own fields override them."""
        return {}

    @property
    def gpus_per_instance(self) -> int:
        """The GPUs one instance spans (tensor x pipeline parallel); 0 if it runs without."""
        return 0

    @abc.abstractmethod
    def create_instance(self, instance_id: str, placement: GpuPlacement = GpuPlacement()) -> EngineInstance:
        """An instance, not started, on the GPUs of `placement`."""

    @abc.abstractmethod
    def create_transfer(self, capacity_blocks: int, block_bytes: int, transport: str,
                        source: EngineInstance, destination: EngineInstance) -> KvTransfer:
        """A transfer for one migration from `source` to `destination` (instances of this
        model), by the path `transport` names (`MigrationSettings.transport`)."""

    @property
    def caches_prefixes(self) -> bool:
        """Whether instances keep finished requests' full blocks in a prefix cache (and look each
        prompt up in it), so that a migration can hand full blocks over stage by stage ahead of
        the final switch."""
        return False

    def can_take_over_from(self, other: ModelRuntime) -> bool:
        """Whether instances of this runtime can continue requests migrated from instances of
        `other` (another version of the model): the same KV-cache layout, and room for what
        those requests may grow to. A change of engine settings then moves running requests
        to the new engines instead of letting them finish on the old ones."""
        return self.kv_layout_difference(other) is None

    def kv_layout_difference(self, other: ModelRuntime) -> str | None:
        """Why requests cannot migrate from instances of `other` to this runtime's (their KV
        blocks differ, or would not fit); None if they can."""
        return None if other is self else "the instances run different engines"

    def describe(self) -> dict[str, Any]:
        """Engine settings worth showing in the model's config endpoint."""
        return {}


class Backend(abc.ABC):
    name: str
    engine_version: str | None = None  # the engine's own version (what vLLM's /version reports)

    def visible_gpus(self) -> tuple[GpuDevice, ...]:
        """The GPUs its engines can use on this host (none for a CPU build, or on a cluster,
        whose scheduler places GPUs itself)."""
        return ()

    def use_cluster(self, address: str) -> None:
        """Run every instance on the nodes of the Ray cluster at `address` ("auto": the one this
        host belongs to) instead of on this host. Raise `ConnectionError` if it cannot be reached."""
        raise ConnectionError(f"backend {self.name!r} cannot place instances on a cluster")

    def check_frontend(self, source: ModelSource) -> None:
        """Raise `ConfigError` for front-end settings (`frontend:`) this backend cannot serve.
        Called on every load, engines restarted or not."""
        if source.config.frontend.tool_call_parser is not None:
            raise ConfigError(source.config_file, "frontend.tool_call_parser",
                              f"backend {self.name!r} parses no tool calls")

    @abc.abstractmethod
    def load_model(self, name: str, source: ModelSource) -> ModelRuntime:
        """Check the engine settings and load what the model needs in the front end (its
        tokenizer). Raise `ConfigError` naming the file and field for a bad configuration
        (`source` says which files the settings came from).
        Blocking: called in a worker thread."""


BackendFactory = Callable[[], Backend]


def load_backend(name: str, config_file: Path | str) -> Backend:
    """Instantiate the backend plugin registered as `name`."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(config_file, "backend", f"unknown backend {name!r} (known: {known})")
    factory: BackendFactory = found[name].load()
    return factory()
