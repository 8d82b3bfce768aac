"""A model's configuration: the schema of `<repository>/<model>/config.yaml`.

    backend: vllm                    # backend plugin (entry point in `llumnix_backend.backends`)
    instances: 2                     # engine instances of this model
    engine:                          # engine arguments, checked by the backend (vLLM: EngineArgs)
      model: weights                 # a folder (relative to the model folder) or a hub id
    resources:                       # what each instance gets
      cpu_kv_cache_gib: 0.5          # CPU engines: KV-cache space
      cpu_threads: 1                 # CPU engines: compute threads (default: cores - 1)
      gpu_memory_utilization: 0.4    # GPU engines: share of the GPU's memory
      gpu_kv_cache_gib: 8            # GPU engines: KV-cache size instead (engines sharing a GPU then start together)
      gpus_per_instance: 1           # GPU engines: GPUs of its own per instance (default: shared)
      gpus: [[0], [1]]               # GPU engines: or pin instance k to the k-th list
      placement: spread              # on a Ray cluster (--ray-address): spread | pack over its nodes
    scheduler:
      dispatch_policy: llumnix       # round_robin | queue | kv_usage | llumnix
      priority: {default: 0, min: -10, max: 10, high_below: 0, headroom_tokens: 0}
      migration: {rescheduling: true, source_below_tokens: 160, destination_above_tokens: 480}
    frontend:                        # the API server's handling (vLLM's front-end arguments)
      tool_call_parser: hermes       # tool calls parsed by the backend's parser of that name
      enable_auto_tool_choice: true  # tool_choice "auto": the model decides
      limits: {max_prompts: 256, max_stop_strings: 64}  # bounds on one request's inputs

Every error names the file and the field (`ConfigError`); unknown keys are errors. A folder in
Triton's format (config.pbtxt and version folders) is read by `triton_config` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_FILE = "config.yaml"


class ConfigError(Exception):
    """A configuration problem, located: `file: field: why`."""

    def __init__(self, file: Path | str, field: str | None, reason: str) -> None:
        self.file = str(file)
        self.field = field
        self.reason = reason
        where = f"{self.file}: {field}" if field else self.file
        super().__init__(f"{where}: {reason}")


class DispatchPolicyName(str, Enum):
    ROUND_ROBIN = "round_robin"
    QUEUE = "queue"
    KV_USAGE = "kv_usage"
    LLUMNIX = "llumnix"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrioritySettings(_Strict):
    """Request priorities follow vLLM's convention: a lower value is more urgent."""

    default: int = 0
    min: int = -10
    max: int = 10
    # Requests with priority below this value are high-priority: the engine queues them first
    # and preempts them last. With `headroom_tokens`, each also reserves that much KV room in
    # the dispatcher's and the rescheduler's accounting (Llumnix's headroom: its instance is
    # kept lighter). Off by default: on the H200, 1,024 tokens per such request made normal
    # requests' P99 TTFT 8.3x and preemptions 2.5-4x, and bought high-priority TTFT nothing
    # (docs/scheduling.md, "Priority headroom").
    high_below: int = 0
    headroom_tokens: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> PrioritySettings:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"need min <= default <= max, got {self.min}, {self.default}, {self.max}")
        return self


class MigrationSettings(_Strict):
    """Live migration of running requests between a model's instances, and the rescheduling
    that triggers it (freeness: free KV room in tokens per request, i.e. the decode steps an
    instance can sustain, whatever its block size; see `policies/dispatch.py` and `policies/rescheduling.py`)."""

    rescheduling: bool = True  # migrate continuously by the policy below (the API always works)
    interval_s: float = Field(default=0.1, gt=0)  # how often the policy looks at the snapshots
    # Instances less free than this send requests away (so do instances that hold a preempted
    # request or cannot admit their next one)...
    source_below_tokens: float = 160.0
    destination_above_tokens: float = 480.0  # ...to instances freer than this
    # Each instance takes part in at most this many migrations at a time; the policy starts only
    # moves that leave the pair better balanced.
    max_in_flight_per_instance: int = Field(default=2, ge=1)
    # How KV blocks travel: "host" (shared memory), "device" (GPU to GPU, CUDA IPC), "network"
    # (between Ray nodes, through Ray's object store), or "auto": network between instances on
    # different nodes, else device on GPU engines and host on CPU ones.
    transport: Literal["auto", "host", "device", "network"] = "auto"
    # Copies made while the request keeps decoding, before the final one (Llumnix: 3).
    max_stages: int = Field(default=3, ge=0, le=16)
    # A stage copies at most this much KV per engine step: the source engine does not step while
    # it copies, so a long sequence moves in chunks with decode steps in between. Default: by
    # transport (`KvTransfer.default_stage_chunk_mib`: 64 MiB through host memory, 1 GiB GPU to
    # GPU, which copies that in about a millisecond).
    stage_chunk_mib: float | None = Field(default=None, gt=0)
    # Go to the final stage once at most this many KV blocks are left to copy.
    final_stage_blocks: int = Field(default=2, ge=0)
    # Any stage (a copy, the destination's admission) taking longer aborts the migration.
    stage_timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed_thresholds(cls, data: Any) -> Any:
        for old in ("source_below", "destination_above"):
            if isinstance(data, dict) and old in data:
                raise ValueError(
                    f"{old} (free KV blocks per request) was replaced by {old}_tokens (free KV tokens per "
                    f"request, the same whatever the block size: the old value times the block size)")
        return data

    @model_validator(mode="after")
    def _destination_freer_than_source(self) -> MigrationSettings:
        if self.destination_above_tokens < self.source_below_tokens:
            raise ValueError("destination_above_tokens must be at least source_below_tokens, got "
                             f"{self.destination_above_tokens} < {self.source_below_tokens}")
        return self


class HealthSettings(_Strict):
    """How a model's control loop finds failed instances and brings them back."""

    # An instance whose engine sent no load report for this long, or finished no step for this
    # long while requests ran on it, is hung: it gets no new requests, its requests continue
    # elsewhere and it is restarted. Engines report every step and send a heartbeat every 50 ms
    # besides, so this has to outlast the longest engine step.
    stale_after_s: float = Field(default=30.0, gt=0)
    # Restart an instance that died or hung after serving (not one that failed to start: its
    # settings need fixing). Waits restart_backoff_s, doubling after each failure in a row up
    # to max_restart_backoff_s.
    restart: bool = True
    restart_backoff_s: float = Field(default=1.0, ge=0)
    max_restart_backoff_s: float = Field(default=60.0, ge=0)
    # Requests of a failed instance continue on another (replay); with no instance to take
    # one, the request waits this long for one to come back, then fails.
    replay: bool = True
    replay_timeout_s: float = Field(default=120.0, gt=0)
    # An instance being retired (fewer instances, new engine settings) whose requests have not
    # left after this long (migrated away, or finished) hands the rest over by replay.
    drain_timeout_s: float = Field(default=300.0, gt=0)


class AdmissionSettings(_Strict):
    """How much a model queues before it refuses new requests (Triton's queue policy)."""

    # Requests dispatched and not yet streaming (their first token still to come), beyond
    # which a new request gets 503 with Retry-After; None: no bound.
    max_waiting_requests: int | None = Field(default=None, ge=0)
    retry_after_s: int = Field(default=1, ge=0)
    # A request still running this long after it arrived is aborted and ends with an error;
    # None: no limit.
    request_timeout_s: float | None = Field(default=None, gt=0)


class SchedulerSettings(_Strict):
    dispatch_policy: DispatchPolicyName = DispatchPolicyName.LLUMNIX
    admission: AdmissionSettings = AdmissionSettings()
    priority: PrioritySettings = PrioritySettings()
    migration: MigrationSettings = MigrationSettings()
    health: HealthSettings = HealthSettings()


class ResourceSettings(_Strict):
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0)
    # CPU engines: compute threads per instance; default: all usable cores but one, left to the
    # engine's scheduler and the HTTP server. Set it when several instances share a host.
    cpu_threads: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    # GPU engines: the KV cache's size, instead of what vLLM's memory profiling leaves of the
    # memory share. With it, engines that share a GPU can start at the same time.
    gpu_kv_cache_gib: float | None = Field(default=None, gt=0)
    # GPU placement (`policies.placement`): by default instances share the GPUs, spread over
    # them; `gpus_per_instance` gives each its own (its tensor x pipeline parallel size);
    # `gpus` pins instance k to the k-th list (lists may repeat, to share a GPU).
    gpus_per_instance: int | None = Field(default=None, ge=1)
    gpus: tuple[tuple[int, ...], ...] | None = None
    # On a Ray cluster (`llumnix-serve --ray-address`): "spread" puts each instance on the node
    # holding fewest of this model's instances, "pack" fills one node before the next
    # (`policies.node_placement`).
    placement: Literal["spread", "pack"] = "spread"

    @model_validator(mode="after")
    def _gpu_lists(self) -> ResourceSettings:
        for placement in self.gpus or ():
            if not placement or min(placement) < 0 or len(set(placement)) != len(placement):
                raise ValueError(f"gpus: each entry is a list of distinct GPU indices (>= 0), got {list(placement)}")
            if self.gpus_per_instance is not None and len(placement) != self.gpus_per_instance:
                raise ValueError(f"gpus: {list(placement)} has {len(placement)} GPU(s), "
                                 f"gpus_per_instance is {self.gpus_per_instance}")
        return self


class RequestLimits(_Strict):
    """Bounds on what one request may ask for, checked before any of it reaches an engine, so
    that no request holds the event loop or an engine's input processing for long (vLLM
    matches stop strings and tokenises bad words on its own event loop, per request). Raise
    them for a model whose clients need more."""

    max_prompts: int = Field(default=256, ge=1)  # prompts in one completion or embeddings request
    max_stop_strings: int = Field(default=64, ge=0)
    max_stop_chars: int = Field(default=1024, ge=1)  # characters of one stop string
    max_bad_words: int = Field(default=256, ge=0)
    max_bad_word_chars: int = Field(default=1024, ge=1)
    # entries of allowed_token_ids, stop_token_ids or logit_bias
    max_token_list: int = Field(default=4096, ge=1)


class FrontendSettings(_Strict):
    """What the API server does with a model's requests and outputs, under the names of vLLM's
    front-end arguments (`vllm serve --tool-call-parser ...`). A change applies without
    restarting the engines."""

    # The backend's parser of the model's tool-call format (vLLM: hermes, llama3_json,
    # mistral, ...): needed for tool_choice "required" or a named tool.
    tool_call_parser: str | None = None
    # Let the model decide whether to call a tool (tool_choice "auto", the default with tools).
    enable_auto_tool_choice: bool = False
    # The chat template, for a tokenizer without one or instead of its own (vLLM's
    # --chat-template): a Jinja template, or a file holding one, relative to the model's folder
    # (read with the config: an edit of the file applies as one of the config does).
    chat_template: str | None = None
    limits: RequestLimits = RequestLimits()

    @property
    def chat_template_is_inline(self) -> bool:
        return self.chat_template is not None and ("{{" in self.chat_template or "{%" in self.chat_template)

    @model_validator(mode="after")
    def _auto_needs_a_parser(self) -> FrontendSettings:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        return self


class ModelConfig(_Strict):
    backend: str = "vllm"
    instances: int = Field(default=1, ge=1, le=64)
    engine: dict[str, Any] = Field(default_factory=dict)
    resources: ResourceSettings = ResourceSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    frontend: FrontendSettings = FrontendSettings()

    @model_validator(mode="after")
    def _a_placement_per_instance(self) -> ModelConfig:
        pinned = self.resources.gpus
        if pinned is not None and len(pinned) < self.instances:
            raise ValueError(f"resources.gpus lists {len(pinned)} placement(s) for {self.instances} instances")
        return self


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_model_config(data: Any, source: Path | str) -> ModelConfig:
    """Validate already-parsed YAML/JSON data; errors name `source` and the first bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, None, f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = first["msg"]
        if first["type"] == "extra_forbidden":
            reason = "unknown key"
        more = len(exc.errors()) - 1
        if more:
            reason += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(source, _field_path(first["loc"]), reason) from None


@dataclass(frozen=True)
class ModelSource:
    """A model's settings, and where they came from: errors name those files, and relative
    paths in the engine arguments start from `engine_dir`."""

    config: ModelConfig
    config_file: str
    engine_file: str  # the file of the engine arguments (config.yaml's `engine` or a model.json)
    engine_dir: Path
    engine_field_prefix: str = "engine."  # how an engine argument's field is named in engine_file
    version: int = 1

    def engine_field(self, key: str) -> str:
        return f"{self.engine_field_prefix}{key}"

    @property
    def engine_section(self) -> str | None:
        """The field naming all engine arguments at once (none in a file of their own)."""
        return self.engine_field_prefix.rstrip(".") or None

    def same_engine(self, other: ModelSource) -> bool:
        """Whether both start the same engines: same backend, arguments and resources."""
        kept = {"scheduler", "instances", "frontend"}
        return (self.engine_dir == other.engine_dir
                and self.config.model_dump(exclude=kept) == other.config.model_dump(exclude=kept))


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate a config.yaml."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, None, f"invalid YAML: {where}{problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, f"cannot read: {exc}") from None
    return parse_model_config(data, path)
