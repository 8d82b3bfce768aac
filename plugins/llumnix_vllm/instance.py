"""One vLLM engine instance: an `AsyncLLM` whose EngineCore runs in its own process.

The front-end half of `AsyncLLM` (input processing, detokenisation) lives in the server
process; the engine itself (scheduler, model, KV cache) lives in the EngineCore process vLLM
starts, so every instance has its own engine process and its own process-global state. Load
snapshots arrive from `LlumnixScheduler` in that process over `snapshot_channel`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.platforms import current_platform
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.executor.abstract import Executor
from vllm.v1.metrics.loggers import PrometheusStatLogger

from llumnix_backend.plugin import EngineDead, EngineInstance, EngineStartFailed, KvExport, KvTransfer, NotExported
from llumnix_backend.requests import (
    EmbeddingRequest,
    GenerationDelta,
    GenerationRequest,
    PromptLogprobs,
    RankedLogprob,
    RequestError,
    TokenLogprob,
)
from llumnix_backend.snapshot import InstanceSnapshot
from llumnix_vllm.engine_errors import start_error
from llumnix_vllm.engine_scheduler import IN_FLIGHT
from llumnix_vllm.kv_transport import SegmentSpec, TransferSegment
from llumnix_vllm.migration_connector import segment_params
from llumnix_vllm.snapshot_channel import SnapshotSubscriber, new_instance_token, snapshot_address

try:  # vLLM >= 0.30: errors caused by the request
    from vllm.exceptions import VLLMClientError

    _CLIENT_ERRORS: tuple[type[Exception], ...] = (ValueError, VLLMClientError)
except ImportError:  # pragma: no cover - older vLLM raises ValueError
    _CLIENT_ERRORS = (ValueError,)

logger = logging.getLogger(__name__)

FIRST_SNAPSHOT_TIMEOUT_S = 30.0
# Per GPU, engines whose KV cache vLLM sizes by profiling start one at a time: each measures
# the memory in use, which another engine loading on that GPU at the same moment would throw off.
# Keyed by GPU index on this host, or by Ray node id for instances on a cluster (Ray assigns
# their GPUs, so a node's are held as one).
_GPU_STARTS: collections.defaultdict[int | str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)


def profiling_start_slot(gpu_or_node: int | str) -> asyncio.Lock:
    """Held while an engine that sizes its KV cache by profiling starts on that GPU (or node)."""
    return _GPU_STARTS[gpu_or_node]
# How long an engine may take to stop before vLLM kills it: one that has compiled structured-
# output grammars takes about 6 s on a small CPU host to exit (vLLM's own default is 5 s).
ENGINE_SHUTDOWN_GRACE_S = 15.0
MAX_IN_FLIGHT_ANSWERS = 100  # a final stage's asks while the request's step is in flight


class _NoEngineMetrics(PrometheusStatLogger):
    """Stands in for vLLM's Prometheus metrics, and records nothing.

    vLLM adds its Prometheus logger to every AsyncLLM unless one of its kind is given. Its
    metrics are process-global: engines built at the same time (several instances in this
    process) unregister and register them concurrently and fail with duplicated timeseries.
    The server keeps its own metrics. Installing a logger also makes vLLM keep per-request
    timings (queue time) in its outputs.
    """

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        pass  # registers nothing

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass


def build_engine(engine_args: AsyncEngineArgs, token: str) -> AsyncLLM:
    """Start one engine (blocking). `token` (`new_instance_token`) names it to the scheduler in
    its process; vLLM's own Prometheus metrics stay off (see `_NoEngineMetrics`)."""
    vllm_config = engine_args.create_engine_config()
    vllm_config.instance_id = token
    _worker_in_the_engine_process(vllm_config)
    return AsyncLLM(
        vllm_config=vllm_config,
        executor_class=Executor.get_class(vllm_config),
        log_stats=False,
        log_requests=False,
        stat_loggers=[_NoEngineMetrics],
    )


def _worker_in_the_engine_process(vllm_config: Any) -> None:
    """On CPU, run a single worker inside the engine-core process, as vLLM does on GPU.

    vLLM's CPU platform always picks its multiprocess executor, because the worker must set the
    OpenMP environment (thread binding) before torch starts its threads. With binding off
    (`nobind`, this backend's default) there is nothing to set, and the second process only
    costs: its spawn and imports (an engine starts in 10 s instead of 20 here) and a message
    round trip between the two per step (tiny-model decode twice as fast)."""
    parallel = vllm_config.parallel_config
    if (current_platform.is_cpu() and parallel.world_size == 1
            and os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind"):
        parallel.distributed_executor_backend = "uni"


def sampling_params(sampling: Mapping[str, Any], **extra: Any) -> SamplingParams:
    """vLLM's SamplingParams from a request's sampling fields (plain data: the structured-output
    constraint arrives as a mapping)."""
    fields = dict(sampling)
    if fields.get("structured_outputs") is not None:
        fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
    return SamplingParams(**fields, **extra)


def pooling_params(request: EmbeddingRequest) -> PoolingParams:
    return PoolingParams(task="embed", dimensions=request.dimensions, use_activation=request.use_activation)


class SegmentTransfer(KvTransfer):
    """A transfer through one segment of this host; `owner` (if given) removes it on close."""

    def __init__(self, spec: SegmentSpec, owner: TransferSegment | None = None) -> None:
        self.spec = spec
        self._owner = owner
        if spec.on_device:
            self.default_stage_chunk_mib = 1024
            self.route = "device"

    @classmethod
    def create(cls, capacity_blocks: int, block_bytes: int, on_device: bool, ranks: int = 1) -> SegmentTransfer:
        segment = TransferSegment(capacity_blocks, block_bytes, on_device, ranks)
        return cls(segment.spec, segment)

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()


class VllmInstance(EngineInstance):
    def __init__(self, instance_id: str, engine_args: AsyncEngineArgs, cpu_threads: int | None = None,
                 start_alone_on: tuple[int, ...] = (),
                 on_snapshot: Callable[[InstanceSnapshot], None] | None = None) -> None:
        """`start_alone_on`: the GPUs on which no other engine may start at the same time;
        `on_snapshot`: called with each load snapshot as it arrives."""
        self.instance_id = instance_id
        self._on_snapshot = on_snapshot
        self._engine_args = engine_args
        self._cpu_threads = cpu_threads
        self._start_alone_on = tuple(sorted(start_alone_on))
        self._engine: AsyncLLM | None = None
        self._subscriber: SnapshotSubscriber | None = None
        self._snapshot: InstanceSnapshot | None = None
        self._snapshot_at: float | None = None
        self._first_snapshot = asyncio.Event()
        self._abandoned: str | None = None  # why, once given up
        self._follow_task: asyncio.Task | None = None
        self._phase: str | None = None  # what `start` does now

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        async with contextlib.AsyncExitStack() as held:
            for gpu in self._start_alone_on:  # in order: two starts never wait on each other
                self._phase = f"waits for GPU {gpu}: one engine at a time sizes its KV cache there by profiling"
                await held.enter_async_context(profiling_start_slot(gpu))
            await self._start()

    @property
    def start_phase(self) -> str | None:
        return self._phase

    async def _start(self) -> None:
        # The token names this engine's snapshot socket; it travels to the engine process in
        # VllmConfig.instance_id, which vLLM keeps out of its compile-cache hash.
        token = new_instance_token()
        self._subscriber = SnapshotSubscriber(snapshot_address(token))
        self._follow_task = asyncio.create_task(self._follow_snapshots(), name=f"snapshots-{self.instance_id}")
        self._phase = "vLLM builds the engine (loads the weights, profiles, allocates the KV cache, compiles)"
        building = asyncio.ensure_future(asyncio.to_thread(build_engine, self._engine_args, token))
        try:
            self._engine = await asyncio.shield(building)
            self._phase = "waits for the engine's first load report"
            await asyncio.wait_for(self._first_snapshot.wait(), FIRST_SNAPSHOT_TIMEOUT_S)
            if self._cpu_threads is not None:
                self._phase = "binds the CPU workers' threads"
                await self._engine.collective_rpc("llumnix_prepare_cpu_worker", args=(self._cpu_threads,))
        except BaseException as exc:
            # A start cannot be interrupted inside vLLM: if cancelled, let it finish, then stop
            # the engine, so that no engine process outlives a cancelled start.
            with contextlib.suppress(Exception):
                self._engine = self._engine or await building
            await self.shutdown()
            cause = start_error(token)  # vLLM's own error only says to look in the log
            if cause is not None and isinstance(exc, Exception):
                raise EngineStartFailed(cause) from exc
            raise


    async def layer_block_bytes(self) -> list[int]:
        """One rank's bytes of a KV block per layer, in a transfer segment's layer order."""
        return (await self._running_engine().collective_rpc("llumnix_layer_block_bytes"))[0]

    async def shutdown(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            self._follow_task = None
        engine, self._engine = self._engine, None
        if engine is not None:
            # A grace period lets the engine stop its workers itself before it is killed.
            await asyncio.to_thread(engine.shutdown, ENGINE_SHUTDOWN_GRACE_S)
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None

    async def _follow_snapshots(self) -> None:
        assert self._subscriber is not None
        while True:
            self._snapshot = await self._subscriber.receive()
            self._snapshot_at = time.monotonic()
            self._first_snapshot.set()
            if self._on_snapshot is not None:
                self._on_snapshot(self._snapshot)

    # --- state --------------------------------------------------------------------------------

    @property
    def latest_snapshot(self) -> InstanceSnapshot | None:
        return self._snapshot

    @property
    def last_report_at(self) -> float | None:
        return self._snapshot_at

    @property
    def alive(self) -> bool:
        # (`errored` is what vLLM's `AsyncLLM.check_health` raises on: its engine-core client
        # saw the engine process die or fail; read here without a call per tick)
        return self._engine is not None and not self._engine.errored and self._abandoned is None

    @property
    def failure(self) -> str | None:
        if self._abandoned is not None:
            return self._abandoned
        if self._engine is None or not self._engine.errored:
            return None
        return _engine_exit(self._engine) or "the engine reported an error (see the server log)"

    def abandon(self, reason: str) -> None:
        if self._abandoned is not None:
            return
        self._abandoned = reason
        if self._engine is not None:
            # vLLM's own way to end every generate() call of this engine with an error.
            self._engine.output_processor.propagate_error(EngineDead(f"instance {self.instance_id}: {reason}"))

    # --- requests -----------------------------------------------------------------------------

    def _running_engine(self) -> AsyncLLM:
        engine = self._engine
        if engine is None or not self.alive:
            raise EngineDead(f"instance {self.instance_id} is not running: {self.failure or 'stopped'}")
        return engine

    async def abort(self, request_id: str) -> None:
        await self._running_engine().abort(request_id)  # vLLM ends its stream with an abort output

    async def export_kv(self, request_id: str, transfer: KvTransfer, first_block: int,
                        max_blocks: int | None = None) -> KvExport | NotExported:
        assert isinstance(transfer, SegmentTransfer)
        segment = dataclasses.asdict(transfer.spec)
        return _kv_export(await self._running_engine().engine_core.call_utility_async(
            "llumnix_export_kv", request_id, first_block, segment, max_blocks
        ))

    async def stop_and_export_kv(self, request_id: str, transfer: KvTransfer,
                                 first_block: int) -> KvExport | NotExported:
        assert isinstance(transfer, SegmentTransfer)
        segment = dataclasses.asdict(transfer.spec)
        engine_core = self._running_engine().engine_core
        # Under async scheduling the engine stops the request but answers "in flight" while a
        # step of it has not landed; each call is served at the next engine iteration, which
        # lands it. (A bound, not a wait: an engine that stops iterating times the stage out.)
        for _ in range(MAX_IN_FLIGHT_ANSWERS):
            result = await engine_core.call_utility_async("llumnix_stop_and_export_kv", request_id, first_block, segment)
            if IN_FLIGHT not in result:
                return _kv_export(result)
        await self.resume_request(request_id)
        return NotExported(f"a step of it stayed in flight through {MAX_IN_FLIGHT_ANSWERS} engine iterations")

    async def resume_request(self, request_id: str) -> None:
        await self._running_engine().engine_core.call_utility_async("llumnix_resume_request", request_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        engine = self._running_engine()
        extra_args = None
        if request.kv_transfer is not None:
            assert isinstance(request.kv_transfer, SegmentTransfer)
            extra_args = {"kv_transfer_params": segment_params(request.kv_transfer.spec)}
        params = sampling_params(request.sampling, output_kind=RequestOutputKind.DELTA, extra_args=extra_args)
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        outputs = engine.generate(prompt, params, request.request_id, priority=request.priority)
        produced = queue_time_told = False
        try:
            async for output in outputs:
                produced = True
                completion = output.outputs[0]
                queue_time = prefill_time = None
                stats = output.metrics  # (the request's stats so far, with every output)
                if not queue_time_told and completion.token_ids and stats is not None and stats.scheduled_ts:
                    queue_time, queue_time_told = max(0.0, stats.scheduled_ts - stats.queued_ts), True
                    if stats.first_token_ts:
                        prefill_time = max(0.0, stats.first_token_ts - stats.scheduled_ts)
                yield GenerationDelta(
                    token_ids=tuple(completion.token_ids),
                    text=completion.text,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                    queue_time=queue_time,
                    prefill_time=prefill_time,
                    num_cached_tokens=output.num_cached_tokens,
                    # (vLLM 0.26, the GPU build, does not count a request's preemptions)
                    num_preemptions=getattr(stats, "num_preemptions", None),
                    logprobs=_token_logprobs(completion, request.sampling.get("logprobs")),
                    prompt_logprobs=_prompt_logprobs(output.prompt_logprobs),
                )
        except EngineDead:
            raise
        except Exception as exc:
            if not self.alive:
                raise EngineDead(f"instance {self.instance_id} failed: {self.failure}") from exc
            if isinstance(exc, _CLIENT_ERRORS) and not produced:  # vLLM refused the request (a bad schema, say)
                raise RequestError(str(exc)) from exc
            raise
        finally:
            # Closing vLLM's generator aborts the request in the engine if it is unfinished.
            await outputs.aclose()


    async def embed(self, request: EmbeddingRequest) -> list[float]:
        engine = self._running_engine()
        final = None
        try:
            async for output in engine.encode({"prompt_token_ids": list(request.prompt_token_ids)},
                                              pooling_params(request), request.request_id, priority=request.priority):
                final = output
        except EngineDead:
            raise
        except Exception as exc:
            if not self.alive:
                raise EngineDead(f"instance {self.instance_id} failed: {self.failure}") from exc
            if isinstance(exc, _CLIENT_ERRORS):
                raise RequestError(str(exc)) from exc
            raise
        if final is None:  # (vLLM ends a stream with its final output; an abort ends it without)
            raise EngineDead(f"instance {self.instance_id} ended request {request.request_id} without an output")
        return final.outputs.data.tolist()


def _token_logprobs(completion: Any, top_n: int | None) -> tuple[TokenLogprob, ...] | None:
    """vLLM's logprobs of the new tokens (a dict per token: the sampled one and the `top_n` most
    likely) as plain data."""
    if top_n is None or not completion.logprobs:
        return None
    result = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda c: c.rank)[:top_n]
        result.append(TokenLogprob(chosen.decoded_token or "", chosen.logprob,
                                   tuple((c.decoded_token or "", c.logprob) for c in ranked),
                                   tuple(RankedLogprob(i, c.decoded_token or "", c.logprob, c.rank)
                                         for i, c in candidates.items())))
    return tuple(result)


def _prompt_logprobs(positions: Any) -> PromptLogprobs | None:
    """vLLM's prompt logprobs (None for the first token, then a dict per token, the prompt's own
    first) as plain data; None on the outputs without them (all but the prefill's last)."""
    if not positions:
        return None
    return tuple(None if candidates is None else
                 tuple(RankedLogprob(token_id, c.decoded_token or "", c.logprob, c.rank)
                       for token_id, c in candidates.items())
                 for candidates in positions)


def _engine_exit(engine: AsyncLLM) -> str | None:
    """How the engine's process ended, if it has (vLLM's engine manager keeps the processes)."""
    resources = getattr(engine.engine_core, "resources", None)
    processes = getattr(getattr(resources, "engine_manager", None), "processes", ())
    for process in processes:
        code = process.exitcode
        if code is not None and code < 0:
            return f"the engine process was killed by {signal.Signals(-code).name}"
        if code is not None:
            return f"the engine process exited with code {code}"
    return None


def _kv_export(result: dict[str, Any]) -> KvExport | NotExported:
    """`llumnix_export_kv`'s answer, which travels as plain data."""
    if "not_exported" in result:
        return NotExported(result["not_exported"])
    return KvExport(tuple(result["token_ids"]), result["blocks"])
