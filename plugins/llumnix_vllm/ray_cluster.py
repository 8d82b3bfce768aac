"""Instances on the nodes of a Ray cluster (`llumnix-serve --ray-address`).

Each instance is a Ray actor (`EngineActor`) on the node `policies.node_placement` chose. Inside
it runs the same `VllmInstance` as on one host: its EngineCore process starts beside it on that
node and sends it snapshots over that node's IPC socket. The server holds a `RayInstance` per
actor, which the core sees as any other `EngineInstance`. Across nodes travel:

- token streams: Ray streaming generators (the actor's `generate`);
- load snapshots: a long poll (`next_snapshot`) that returns the newest one, so a slow reader
  skips stale snapshots as the local channel does; it answers at least every second with the
  engine's health, so a dead engine shows at once and a hung node shows as stale reports;
- control calls (abort, KV export, resume): actor calls.

An actor that is lost (its node gone, its process killed) fails every call with
`RayActorError`: the instance is dead, its requests are replayed elsewhere, and it is restarted
on a live node.

Migration between two instances of one node goes through one shared-memory (or CUDA IPC)
segment on that node, as on one host. Between nodes, or with transport "network", each side has
a host segment of its own, and each run of copied positions travels through Ray's object store
from the source's actor to the destination's (never through the server) before the destination
loads it. Which path a migration takes is decided by the two actors' node ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from vllm.engine.arg_utils import AsyncEngineArgs

from llumnix_backend.plugin import EngineDead, EngineInstance, EngineStartFailed, KvExport, KvTransfer, NotExported
from llumnix_backend.policies.node_placement import InstanceResources, NodeResources, PlacementMode, choose_node
from llumnix_backend.policies.placement import PlacementError
from llumnix_backend.requests import EmbeddingRequest, GenerationDelta, GenerationRequest
from llumnix_backend.snapshot import InstanceSnapshot
from llumnix_vllm.instance import ENGINE_SHUTDOWN_GRACE_S, SegmentTransfer, VllmInstance, profiling_start_slot
from llumnix_vllm.kv_transport import SegmentSpec, TransferSegment, read_positions, write_positions

logger = logging.getLogger(__name__)

T = TypeVar("T")

NAMESPACE = "llumnix"
SNAPSHOT_POLL_S = 1.0  # the longest a snapshot poll waits for a new snapshot
# How long an actor may wait for its node to take it (resources another job holds, say).
ACTOR_SCHEDULE_TIMEOUT_S = 120.0
# The environment the engines' processes need, whatever the nodes' own environment is.
ENGINE_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_NO_USAGE_STATS", "VLLM_WORKER_MULTIPROC_METHOD",
              "VLLM_USE_V2_MODEL_RUNNER", "VLLM_LOGGING_LEVEL")


class RayCluster:
    """The server's connection to a Ray cluster, and the resources its instances reserve on
    each node (free = a node's total less what this server's actors hold)."""

    def __init__(self, address: str) -> None:
        env = {key: os.environ[key] for key in ENGINE_ENV if key in os.environ}
        try:
            ray.init(address=address, namespace=NAMESPACE, runtime_env={"env_vars": env},
                     logging_level=logging.WARNING, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds for an unreachable cluster
            raise ConnectionError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
        # What this server's instances reserve, by instance start: (model, node id, resources).
        self._reserved: dict[str, tuple[str, str, InstanceResources]] = {}

    def place(self, key: str, model: str, demand: InstanceResources, mode: PlacementMode) -> str:
        """Reserve room for one instance start (`key`, unique to it) and return its node's id."""
        nodes = []
        for node in ray.nodes():
            if not node["Alive"]:
                continue
            node_id, total = node["NodeID"], node["Resources"]
            held = [r for m, n, r in self._reserved.values() if n == node_id]
            nodes.append(NodeResources(
                node_id, total.get("CPU", 0.0) - sum(r.cpus for r in held),
                total.get("GPU", 0.0) - sum(r.gpus for r in held),
                sum(1 for m, n, _ in self._reserved.values() if n == node_id and m == model)))
        chosen = choose_node(nodes, demand, mode)
        self._reserved[key] = (model, chosen, demand)
        return chosen

    def release(self, key: str) -> None:
        self._reserved.pop(key, None)

    def start_actor(self, node_id: str, demand: InstanceResources, *args: Any) -> Any:
        remote = ray.remote(EngineActor).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            num_cpus=demand.cpus, num_gpus=demand.gpus, max_concurrency=10_000)
        return remote.remote(*args)


class EngineActor:
    """One engine instance on its node (a Ray actor): a `VllmInstance` and the transfer
    segments it created there."""

    def __init__(self, instance_id: str, engine_args: AsyncEngineArgs, cpu_threads: int | None) -> None:
        from llumnix_vllm.backend import prepare_engine_environment

        prepare_engine_environment()
        self._instance = VllmInstance(instance_id, engine_args, cpu_threads, on_snapshot=self._arrived)
        self._arrivals = 0
        self._arrival = asyncio.Event()
        self._segments: dict[str, TransferSegment] = {}
        self._deliveries: dict[str, _Deliveries] = {}  # by the path of the segment they go into
        self._layer_bytes: list[int] = []

    def _arrived(self, snapshot: InstanceSnapshot) -> None:
        self._arrivals += 1
        self._arrival.set()
        self._arrival = asyncio.Event()

    async def start(self) -> str:
        await self._instance.start()
        self._layer_bytes = await self._instance.layer_block_bytes()
        return ray.get_runtime_context().get_node_id()

    async def next_snapshot(self, seen: int) -> tuple[int, InstanceSnapshot | None, str | None]:
        """The newest snapshot once more than `seen` have arrived, or after `SNAPSHOT_POLL_S`;
        with the count so far and why the engine is not alive (None while it is)."""
        if self._arrivals <= seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), SNAPSHOT_POLL_S)
        alive = self._instance.alive
        return self._arrivals, self._instance.latest_snapshot, None if alive else (self._instance.failure or "stopped")

    async def generate(self, request: GenerationRequest, runs: int = 0) -> AsyncIterator[GenerationDelta]:
        """Stream the request; a migrated one's first `runs` position runs (`receive_positions`)
        are written into its segment first."""
        if runs:
            assert isinstance(request.kv_transfer, SegmentTransfer)
            await self._deliveries_into(request.kv_transfer.spec).written(runs)
        async for delta in self._instance.generate(request):
            yield delta

    async def receive_positions(self, spec: SegmentSpec, index: int, first_block: int,
                                data: list[ray.ObjectRef]) -> None:
        """Have run `index` of the positions another node's actor exports (`data[0]`, see
        `export_kv`; its ref is wrapped so that Ray does not hold this call back until it
        exists) written into this node's `spec` once it arrives, after the runs before it."""
        async def write(positions: list[bytes] | None) -> None:
            if positions is not None:
                await asyncio.to_thread(write_positions, spec, self._layer_bytes, first_block, positions)

        self._deliveries_into(spec).add(index, data[0], write)

    def _deliveries_into(self, spec: SegmentSpec) -> _Deliveries:
        return self._deliveries.setdefault(spec.path, _Deliveries())

    async def embed(self, request: EmbeddingRequest) -> list[float]:
        return await self._instance.embed(request)

    async def abort(self, request_id: str) -> None:
        await self._instance.abort(request_id)

    # The two exports return two objects (`num_returns=2`): the answer, which the server reads,
    # and, with `read`, the positions the export wrote, which stay in this node's object store
    # until the destination's actor fetches them (`receive_positions`, called as the export is):
    # the bytes never pass through the server, and they cross while the answer travels.

    async def export_kv(self, request_id: str, spec: SegmentSpec, first_block: int, max_blocks: int | None,
                        read: bool) -> tuple[KvExport | NotExported, list[bytes] | None]:
        result = await self._instance.export_kv(request_id, SegmentTransfer(spec), first_block, max_blocks)
        return result, await self._exported_positions(spec, first_block, result, read)

    async def stop_and_export_kv(self, request_id: str, spec: SegmentSpec, first_block: int,
                                 read: bool) -> tuple[KvExport | NotExported, list[bytes] | None]:
        result = await self._instance.stop_and_export_kv(request_id, SegmentTransfer(spec), first_block)
        return result, await self._exported_positions(spec, first_block, result, read)

    async def _exported_positions(self, spec: SegmentSpec, first_block: int, result: KvExport | NotExported,
                                  read: bool) -> list[bytes] | None:
        if not read or not isinstance(result, KvExport) or result.blocks <= first_block:
            return None
        return await asyncio.to_thread(read_positions, spec, self._layer_bytes, first_block, result.blocks)

    async def resume_request(self, request_id: str) -> None:
        await self._instance.resume_request(request_id)

    def open_segment(self, capacity_blocks: int, block_bytes: int, on_device: bool, ranks: int) -> SegmentSpec:
        segment = TransferSegment(capacity_blocks, block_bytes, on_device, ranks)
        self._segments[segment.spec.path] = segment
        return segment.spec

    def close_segment(self, path: str) -> None:
        deliveries = self._deliveries.pop(path, None)
        if deliveries is not None:
            deliveries.cancel()
        segment = self._segments.pop(path, None)
        if segment is not None:
            segment.close()

    async def shutdown(self) -> None:
        for path in list(self._segments):
            self.close_segment(path)
        await self._instance.shutdown()


class _Deliveries:
    """The position runs on their way into one segment of a destination's node, written in the
    order they were exported (a run's last block may be rewritten by the next), whatever order
    Ray runs the calls that bring them in."""

    def __init__(self) -> None:
        self._done: dict[int, asyncio.Future] = {}  # by run index: set once it and those before are written
        self._tasks: set[asyncio.Task] = set()

    def _slot(self, index: int) -> asyncio.Future:
        return self._done.setdefault(index, asyncio.get_running_loop().create_future())

    def add(self, index: int, data: ray.ObjectRef, write: Callable[[Any], Awaitable[None]]) -> None:
        """Run `index`: fetch `data` now, `write` it once the run before is written."""
        async def in_order() -> None:
            done = self._slot(index)
            arriving = asyncio.ensure_future(data)
            try:
                if index:
                    await asyncio.shield(self._slot(index - 1))
                await write(await arriving)
                done.set_result(None)
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits for the run
                arriving.cancel()
                done.set_exception(exc)
                done.exception()  # (retrieved: a migration given up never asks)

        task = asyncio.ensure_future(in_order())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def written(self, runs: int) -> None:
        """Once the first `runs` runs are written; raises what a failed one raised."""
        await asyncio.shield(self._slot(runs - 1))

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


class RayInstance(EngineInstance):
    """The server's handle on one `EngineActor`."""

    def __init__(self, cluster: RayCluster, model: str, instance_id: str, engine_args: AsyncEngineArgs,
                 cpu_threads: int | None, demand: InstanceResources, mode: PlacementMode,
                 start_alone: bool = False) -> None:
        """`start_alone`: no other such instance may start on the same node at the same time."""
        self.instance_id = instance_id
        self._cluster = cluster
        self._model = model
        self._key = f"{model}/{instance_id}/{uuid.uuid4().hex[:8]}"  # this start's reservation
        self._actor_args = (instance_id, engine_args, cpu_threads)
        self._demand = demand
        self._mode = mode
        self._start_alone = start_alone and demand.gpus > 0
        self._actor: Any = None
        self._node: str | None = None
        self._snapshot: InstanceSnapshot | None = None
        self._snapshot_at: float | None = None
        self._engine_failure: str | None = None  # what the actor says of its engine
        self._lost: str | None = None  # why the actor itself is gone
        self._abandoned: str | None = None
        self._gone: asyncio.Future | None = None  # fails with EngineDead once the instance is not alive
        self._first_snapshot = asyncio.Event()
        self._follow_task: asyncio.Task | None = None
        self._phase: str | None = None  # what `start` does now

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def start_phase(self) -> str | None:
        return self._phase

    async def start(self) -> None:
        try:
            node = self._cluster.place(self._key, self._model, self._demand, self._mode)
        except PlacementError as exc:
            raise EngineStartFailed(f"cannot be placed: {exc}") from None
        self._gone = asyncio.get_running_loop().create_future()
        self._actor = self._cluster.start_actor(node, self._demand, *self._actor_args)
        self._phase = f"waits for Ray to start its actor on node {node}"
        try:
            try:
                await asyncio.wait_for(self._actor.__ray_ready__.remote(), ACTOR_SCHEDULE_TIMEOUT_S)
            except TimeoutError:
                raise EngineStartFailed(f"node {node} did not take the instance's actor within "
                                        f"{ACTOR_SCHEDULE_TIMEOUT_S:g} s (its resources are held elsewhere?)") from None
            if self._start_alone:
                self._phase = f"waits for node {node}: one engine at a time sizes its KV cache there by profiling"
            async with profiling_start_slot(node) if self._start_alone else contextlib.nullcontext():
                self._phase = f"vLLM builds the engine in its actor on node {node}"
                try:
                    self._node = await self._actor.start.remote()
                except RayTaskError as exc:
                    raise _cause(exc) from None
            self._follow_task = asyncio.create_task(self._follow(), name=f"ray-snapshots-{self._key}")
            await self._first_snapshot.wait()  # (the first poll answers at once: the engine has reported)
            if self._lost is not None:
                raise EngineStartFailed(self._lost)
        except BaseException:
            await self.shutdown()
            raise

    async def shutdown(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            self._follow_task = None
        actor, self._actor = self._actor, None
        if actor is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(actor.shutdown.remote(), ENGINE_SHUTDOWN_GRACE_S + 5)
            ray.kill(actor)
        self._cluster.release(self._key)
        self._went("stopped")

    async def _follow(self) -> None:
        seen = 0
        try:
            while True:
                count, snapshot, self._engine_failure = await self._actor.next_snapshot.remote(seen)
                if count > seen:
                    seen, self._snapshot, self._snapshot_at = count, snapshot, time.monotonic()
                self._first_snapshot.set()
                if self._engine_failure is not None:
                    self._went(self._engine_failure)
        except RayActorError as exc:
            self._lost = f"its Ray actor on node {self._node} was lost ({type(exc).__name__})"
            self._went(self._lost)
            self._first_snapshot.set()

    def _went(self, reason: str) -> None:
        if self._gone is not None and not self._gone.done():
            self._gone.set_exception(EngineDead(f"instance {self.instance_id}: {reason}"))
            self._gone.exception()  # (retrieved: nobody may be waiting)

    # --- state --------------------------------------------------------------------------------

    @property
    def node(self) -> str | None:
        return self._node

    @property
    def latest_snapshot(self) -> InstanceSnapshot | None:
        return self._snapshot

    @property
    def last_report_at(self) -> float | None:
        return self._snapshot_at

    @property
    def alive(self) -> bool:
        return self._actor is not None and self._node is not None and self.failure is None

    @property
    def failure(self) -> str | None:
        return self._abandoned or self._lost or self._engine_failure

    def abandon(self, reason: str) -> None:
        if self._abandoned is None:
            self._abandoned = reason
            self._went(reason)

    # --- requests -----------------------------------------------------------------------------

    def _running_actor(self) -> Any:
        if not self.alive:
            raise EngineDead(f"instance {self.instance_id} is not running: {self.failure or 'stopped'}")
        return self._actor

    async def _call(self, call: Awaitable[T]) -> T:
        """An actor call's answer, or `EngineDead` as soon as the instance is lost, whichever
        comes first; the actor's own errors are raised as what they were there."""
        assert self._gone is not None
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait({task, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            self._gone.result()  # raises EngineDead
        try:
            return task.result()
        except RayTaskError as exc:
            raise _cause(exc) from None
        except RayActorError as exc:
            raise EngineDead(f"instance {self.instance_id}: its Ray actor was lost ({exc})") from None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        actor = self._running_actor()
        runs = 0
        if request.kv_transfer is not None:
            assert isinstance(request.kv_transfer, RayTransfer)
            spec, runs = await request.kv_transfer.delivery(self)
            request = dataclasses.replace(request, kv_transfer=SegmentTransfer(spec))
        stream = actor.generate.options(num_returns="streaming").remote(request, runs)
        finished = False
        try:
            while not finished:
                try:
                    delta = await self._call(_next_item(stream))
                except StopAsyncIteration:
                    return
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                # Ending the actor's generator ends vLLM's, which aborts the request there.
                ray.cancel(stream)
                if self.alive:
                    with contextlib.suppress(Exception):  # (a hung actor's call ends once it is abandoned)
                        await self._call(self._actor.abort.remote(request.request_id))

    async def embed(self, request: EmbeddingRequest) -> list[float]:
        return await self._call(self._running_actor().embed.remote(request))

    async def abort(self, request_id: str) -> None:
        await self._call(self._running_actor().abort.remote(request_id))

    async def export_kv(self, request_id: str, transfer: KvTransfer, first_block: int,
                        max_blocks: int | None = None) -> KvExport | NotExported:
        return await self._export("export_kv", request_id, transfer, first_block, max_blocks)

    async def stop_and_export_kv(self, request_id: str, transfer: KvTransfer,
                                 first_block: int) -> KvExport | NotExported:
        return await self._export("stop_and_export_kv", request_id, transfer, first_block)

    async def _export(self, method: str, request_id: str, transfer: KvTransfer, first_block: int,
                      *args: Any) -> KvExport | NotExported:
        """Call one of the actor's exports (`args`: its own, between `first_block` and `read`)."""
        assert isinstance(transfer, RayTransfer)
        spec = await transfer.segments_for_export()
        answer, data = getattr(self._running_actor(), method).options(num_returns=2).remote(
            request_id, spec, first_block, *args, transfer.network)
        transfer.forward(first_block, data)
        return await self._call(answer)

    async def resume_request(self, request_id: str) -> None:
        await self._call(self._running_actor().resume_request.remote(request_id))


async def _next_item(stream: Any) -> GenerationDelta:
    return await (await stream.__anext__())


def _cause(error: RayTaskError) -> BaseException:
    """The exception an actor method raised, as it was raised there."""
    cause = error.cause
    return cause if isinstance(cause, BaseException) else RuntimeError(str(error))


class RayTransfer(KvTransfer):
    """One migration's KV blocks between two `RayInstance`s: a segment on each side's node, or
    one both share when they are on the same node and the network path is not forced."""

    def __init__(self, capacity_blocks: int, block_bytes: int, ranks: int, on_device: bool,
                 source: RayInstance, destination: RayInstance, force_network: bool) -> None:
        self._shape = (capacity_blocks, block_bytes, ranks)
        self._source, self._destination = source, destination
        self.network = force_network or source.node != destination.node
        self._on_device = on_device and not self.network
        self.route = "network" if self.network else "device" if self._on_device else "host"
        if self._on_device:
            self.default_stage_chunk_mib = 1024
        self._segments: dict[RayInstance, SegmentSpec] = {}  # by the instance whose actor created it
        self._lock = asyncio.Lock()
        self._runs = 0  # over the network: position runs forwarded to the destination so far

    async def segment_of(self, instance: RayInstance) -> SegmentSpec:
        """The segment `instance` reads or fills, created on its node when first asked for."""
        owner = instance if self.network else self._source
        async with self._lock:
            if owner not in self._segments:
                capacity, block_bytes, ranks = self._shape
                self._segments[owner] = await owner._call(
                    owner._running_actor().open_segment.remote(capacity, block_bytes, self._on_device, ranks))
            return self._segments[owner]

    async def segments_for_export(self) -> SegmentSpec:
        """The segment an export from the source fills, once (over the network) the one the
        destination receives into exists too."""
        if self.network:
            await self.segment_of(self._destination)
        return await self.segment_of(self._source)

    def forward(self, first_block: int, data: ray.ObjectRef) -> None:
        """Over the network: have the destination's actor write the positions an export from the
        source is reading back (`data`, from `first_block` on; None if it reads none) as soon as
        they exist, after the runs before, while the export's answer travels to the server.
        (Never raises: the export's answer must be read. A destination gone by now fails its
        request's start, which the migration reports.)"""
        actor = self._destination._actor
        if self.network and actor is not None:
            actor.receive_positions.remote(self._segments[self._destination], self._runs, first_block, [data])
            self._runs += 1

    async def delivery(self, destination: RayInstance) -> tuple[SegmentSpec, int]:
        """The segment the destination loads from, and (over the network) how many position runs
        its actor must have written into it first."""
        return await self.segment_of(destination), self._runs

    def close(self) -> None:
        for owner, spec in self._segments.items():
            if owner._actor is not None:
                owner._actor.close_segment.remote(spec.path)  # (not awaited: a dead actor took it along)
        self._segments.clear()
