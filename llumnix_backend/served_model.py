"""A served model: its engine instances, the Llumnix dispatcher in front of them, and the
model's control loop.

The dispatcher decides from the latest snapshot of each instance plus the requests it has sent
there that the snapshot does not show yet, so a burst of requests spreads out before the
engines report back; it never waits on an instance to decide.

The control loop ticks every `migration.interval_s`: `policies.control.plan_tick` decides
from the instances' health and load, and the config's instance count, which instances are
lost, which to start, restart, retire or stop, when to switch to the engines a reload brings
in, and which requests to migrate; this module only carries the plan out. Starting the
model, a config edit and a reload with new engines set the target and run a tick at once.

A request whose instance is lost continues on another one (replay): its prompt plus every
token the client has received, with the sampling budget that is left, recomputed there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from llumnix_backend.config import ModelSource
from llumnix_backend.errors import Overloaded, Refusal, RequestTimedOut, ShuttingDown
from llumnix_backend.gpus import GpuInventory
from llumnix_backend.policies.dispatch import NoInstanceAvailable, choose_instance, freeness
from llumnix_backend.metrics import InstanceReport, ServerMetrics
from llumnix_backend.migration import (
    MigrationRejected,
    MigrationReport,
    RequestStream,
    check_destination,
    migrate_request,
    relay,
)
from llumnix_backend.plugin import EngineDead, EngineInstance, EngineStartFailed, InstanceState, ModelRuntime
from llumnix_backend.policies.control import ControlPlan, InstanceHealth, plan_tick
from llumnix_backend.policies.placement import GpuPlacement, PlacementError, demand_of, instances_per_gpu
from llumnix_backend.policies.rescheduling import PlannedMigration
from llumnix_backend.request_accounting import ChoiceGroup, ModelStats, RequestTracker
from llumnix_backend.requests import EmbeddingRequest, GenerationDelta, GenerationRequest, RequestError, check_limits
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, RequestLoad, blocks_for

logger = logging.getLogger(__name__)

# Before an engine reports its block size, pending demand is estimated with this one.
DEFAULT_BLOCK_SIZE = 16
T = TypeVar("T")
IDLE_POLL_S = 0.05  # how often `wait_idle` and a waiting replay look (requests last far longer)


@dataclass(frozen=True)
class InstanceEvent:
    """Start-up progress of one instance, for the terminal."""

    model: str
    instance_id: str
    state: InstanceState
    seconds: float
    error: str | None = None
    gpus: tuple[int, ...] = ()
    node: str | None = None  # the Ray node it started on (None on a single host)
    phase: str | None = None  # while starting: what it waits for (after the first event)


ProgressCallback = Callable[[InstanceEvent], None]


@dataclass(frozen=True)
class InstanceStarts:
    """How the server starts instances: at most as many at once as `slots` allows, telling
    `progress` when one waits for a slot, as each begins and ends, and every `progress_every_s`
    while it starts."""

    slots: asyncio.Semaphore
    progress: ProgressCallback
    progress_every_s: float = 15.0


@dataclass
class _Instance:
    engine: EngineInstance
    runtime: ModelRuntime  # the model version it runs
    placement: GpuPlacement = GpuPlacement()
    state: InstanceState = InstanceState.STARTING
    error: str | None = None
    served: bool = False  # it has served since it was added: if it dies it is restarted
    failures: int = 0  # deaths and failed restarts in a row
    down_since: float | None = None  # time.monotonic() of the latest failure
    busy: bool = False  # its engine is being stopped or restarted
    # Set once it is no longer one of the model's: it drains until then, and the plan stops it
    # once it is empty (`_retire_instances`).
    retire_by: float | None = None
    # Requests dispatched here and not finished.
    in_flight: set[str] = field(default_factory=set)
    # Those of them no snapshot has shown yet (as of `_seen`, the latest snapshot looked at),
    # with their demand at dispatch time: kept apart so that a view costs O(unseen requests).
    _unseen: dict[str, RequestLoad] = field(default_factory=dict)
    _seen: InstanceSnapshot | None = None
    # Requests that have left (finished, migrated away) while the latest snapshot still shows them.
    _departed: set[str] = field(default_factory=set)

    # The latest view, and what it was built from: rebuilt only when one of them changes.
    _view: InstanceView | None = None
    _view_inputs: tuple = ()
    # The engine's newest step report (its snapshot sequence: an idle engine's heartbeat re-sends
    # the same one) and when it arrived.
    _stepped: tuple[int, float] | None = None

    def track(self, load: RequestLoad) -> None:
        self.in_flight.add(load.request_id)
        self._unseen[load.request_id] = load
        self._view = None

    def renew(self, engine: EngineInstance) -> None:
        """Take a new engine (a restart): nothing of the old one's load carries over."""
        self.engine, self.state, self.in_flight = engine, InstanceState.STARTING, set()
        self._unseen, self._seen, self._view, self._departed = {}, None, None, set()
        self._stepped = None

    @property
    def retiring(self) -> bool:
        return self.retire_by is not None

    def health(self, instance_id: str, migrating: bool, current: bool = True, incoming: bool = False,
               hosts_requests: bool = False) -> InstanceHealth:
        """`migrating`: it takes part in a migration now (a request stopped for the switch holds
        its engine's steps up, and the migration's own stage timeout covers that); `current`: it
        runs the model's current engines; `incoming`: those a reload brings in;
        `hosts_requests`: requests run on it."""
        return InstanceHealth(instance_id, self.state, self.engine.alive, self.engine.last_report_at, self.served,
                              self.failures, self.down_since, self.busy, self.engine.failure,
                              None if migrating else self._stepping_since(), current, incoming, self.retire_by,
                              hosts_requests)

    def _stepping_since(self) -> float | None:
        """While requests run here, when the engine's latest step report arrived."""
        snapshot, arrived = self.engine.latest_snapshot, self.engine.last_report_at
        if snapshot is None or arrived is None:
            return None
        if self._stepped is None or self._stepped[0] != snapshot.sequence:
            self._stepped = (snapshot.sequence, arrived)
        return self._stepped[1] if snapshot.running else None

    def untrack(self, request_id: str) -> None:
        self.in_flight.discard(request_id)
        if self._unseen.pop(request_id, None) is not None:
            self._view = None
        elif (snapshot := self.engine.latest_snapshot) is not None and request_id in snapshot.request_ids:
            self._departed.add(request_id)
            self._view = None

    def view(self, instance_id: str) -> InstanceView | None:
        snapshot = self.engine.latest_snapshot
        if snapshot is None:
            return None
        inputs = (snapshot, self.state, self.engine.alive)
        if self._view is not None and all(a is b for a, b in zip(inputs, self._view_inputs)):
            return self._view
        if snapshot is not self._seen:
            known = snapshot.request_ids
            self._unseen = {rid: load for rid, load in self._unseen.items() if rid not in known}
            self._departed &= known
            self._seen = snapshot
        self._view, self._view_inputs = InstanceView(
            instance_id=instance_id,
            snapshot=snapshot.without(frozenset(self._departed)).with_pending(tuple(self._unseen.values())),
            accepting=self.state is InstanceState.READY and self.engine.alive,
            draining=self.state is InstanceState.DRAINING,
        ), inputs
        return self._view


@dataclass
class _Replacement:
    """Engines of new settings a reload brings in (`ServedModel.replace_engines`)."""

    source: ModelSource
    runtime: ModelRuntime
    outcome: asyncio.Future  # "" once the model switched to them, else why not


class ServedModel:
    def __init__(self, name: str, source: ModelSource, runtime: ModelRuntime, metrics: ServerMetrics,
                 gpus: GpuInventory | None = None) -> None:
        self.name = name
        self._gpus = gpus or GpuInventory()
        self.source = source  # the folder's settings it was started or last reconfigured with
        self.config = source.config  # the settings in effect
        self.runtime = runtime
        self._metrics = metrics
        self._instances: dict[str, _Instance] = {}
        self._next_index = 0
        self._last_choice: str | None = None
        self._streams: dict[str, RequestStream] = {}  # running requests, by id
        self._waiting: set[str] = set()  # of them, those whose first token is still to come
        self._migrating: set[str] = set()
        self._bound: set[str] = set()  # running requests that cannot move (`bound_to_its_engine`)
        self._migrations_at: Counter[str] = Counter()  # migrations in flight per instance
        self._control: asyncio.Task | None = None
        self._closing = False  # the server is shutting down
        self.stats = ModelStats()
        self._tasks: set[asyncio.Task] = set()  # what runs in the background: migrations, starts, restarts
        self._stops: set[asyncio.Task] = set()  # engines of instances taken out, being stopped
        self._starts: InstanceStarts | None = None
        self._incoming: _Replacement | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, starts: InstanceStarts) -> None:
        """Start the configured number of instances and the control loop; failures are
        recorded, not raised."""
        self._starts = starts
        await self._tick_now()
        self._control = asyncio.create_task(self._control_loop(), name=f"control-{self.name}")

    async def reconfigure(self, source: ModelSource, starts: InstanceStarts) -> None:
        """Switch to `source`, which starts the same engines (`ModelSource.same_engine`), without
        restarting what keeps running: the new settings apply at once, and the instance count
        by a tick of the plan. Returns once the instances it starts have started (or failed);
        surplus ones drain and stop in the background, the reload does not wait for them."""
        self.source, self.config, self._starts = source, source.config, starts
        # An instance that never started is tried again with the new settings: it makes way
        # for a new one.
        for instance_id in [i for i, s in self._instances.items() if s.state is InstanceState.FAILED
                            and not s.served and not s.busy and s.runtime is self.runtime]:
            self._remove_and_stop(instance_id)
        await self._tick_now()

    async def replace_engines(self, source: ModelSource, runtime: ModelRuntime, starts: InstanceStarts) -> str:
        """Switch to engines of new settings (`source`, loaded as `runtime`) that can take over
        requests from the current ones (`ModelRuntime.can_take_over_from`). The plan starts the
        new instances beside the old ones; once one serves, the model switches to them, and
        the old ones are retired in the background: what they run migrates to the new ones.
        Returns "" once switched and every new instance has started (or failed), or why not
        (none started; nothing changed then)."""
        self._starts = starts
        self._incoming = _Replacement(source, runtime, asyncio.get_running_loop().create_future())
        outcome = self._incoming.outcome
        await self._tick_now()
        return await outcome

    def _switch_to_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        assert incoming is not None
        self.source, self.config, self.runtime = incoming.source, incoming.source.config, incoming.runtime
        self._retire_instances([i for i, s in self._instances.items()
                                if s.runtime is not incoming.runtime and not s.retiring])
        incoming.outcome.set_result("")

    def _give_up_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        assert incoming is not None
        added = [i for i, s in self._instances.items() if s.runtime is incoming.runtime]
        reasons = "; ".join(f"instance {i}: {self._instances[i].error}" for i in added)
        for instance_id in added:
            self._remove_and_stop(instance_id)
        incoming.outcome.set_result(f"no instance started ({reasons})")

    def _retire_instances(self, instance_ids: Sequence[str]) -> None:
        """Take instances out of the model and out of dispatch now. The plan stops each once the
        requests it runs have left (migrated away by rescheduling, or finished where they are if
        it is off); past `health.drain_timeout_s`, it evicts what is left to continue elsewhere
        by replay."""
        deadline = time.monotonic() + self.config.scheduler.health.drain_timeout_s
        for instance_id in instance_ids:
            slot = self._instances[instance_id]
            slot.served, slot.retire_by = False, deadline  # not restarted if it fails from now on
            if slot.state is InstanceState.READY:
                slot.state = InstanceState.DRAINING

    def _hosting(self) -> set[str]:
        """The instances requests run on (dispatched, or streaming from them)."""
        return {i for i, s in self._instances.items() if s.in_flight} | {s.instance_id for s in self._streams.values()}

    def _add_instance(self, runtime: ModelRuntime, source: ModelSource) -> str:
        """Add an instance of `runtime` (started by `_start_instance`) on the GPUs placement
        gives it; one that cannot be placed is added as failed, with the reason."""
        config = source.config
        instance_id = str(self._next_index)
        self._next_index += 1
        demand = demand_of(config.resources, runtime.gpus_per_instance)
        mine = [s.placement.gpus for s in self._instances.values() if s.runtime is runtime]
        error = None
        try:
            gpus = self._gpus.acquire(f"{self.name}/{instance_id}", demand, mine)
        except PlacementError as exc:
            gpus, error = (), f"cannot be placed ({source.config_file}: resources): {exc}"
        placement = GpuPlacement(gpus, instances_per_gpu(demand, config.instances, len(self._gpus.devices)))
        slot = _Instance(runtime.create_instance(instance_id, placement), runtime, placement)
        if error is not None:
            slot.state, slot.error = InstanceState.FAILED, error
            logger.error("model %s instance %s %s", self.name, instance_id, error)
        self._instances[instance_id] = slot
        return instance_id

    def _remove(self, instance_id: str) -> _Instance:
        self._gpus.release(f"{self.name}/{instance_id}")
        return self._instances.pop(instance_id)

    async def _start_instance(self, instance_id: str, starts: InstanceStarts) -> None:
        slot = self._instances[instance_id]
        progress = starts.progress
        if slot.state is InstanceState.FAILED and not slot.served:
            progress(InstanceEvent(self.name, instance_id, slot.state, 0.0, slot.error))
            return  # it could not be placed
        gpus = slot.placement.gpus
        if starts.slots.locked():
            progress(InstanceEvent(self.name, instance_id, InstanceState.STARTING, 0.0, gpus=gpus,
                                   phase="waits for a start slot (--max-parallel-starts)"))
        async with starts.slots:
            began = time.monotonic()
            progress(InstanceEvent(self.name, instance_id, InstanceState.STARTING, 0.0, gpus=gpus))

            def still() -> None:
                progress(InstanceEvent(self.name, instance_id, InstanceState.STARTING, time.monotonic() - began,
                                       gpus=gpus, phase=slot.engine.start_phase or "starting"))

            try:
                await _reporting(slot.engine.start(), starts.progress_every_s, still)
            except Exception as exc:  # noqa: BLE001 - any start failure marks only this instance
                error = str(exc) if isinstance(exc, EngineStartFailed) else f"{type(exc).__name__}: {exc}"
                slot.state, slot.error = InstanceState.FAILED, error
                logger.error("model %s instance %s failed to start: %s", self.name, instance_id, slot.error)
                if not slot.served:  # never restarted: its GPUs are free for others
                    self._gpus.release(f"{self.name}/{instance_id}")
            else:
                # (one retired while it started comes up drained, for the plan to stop it)
                slot.error, slot.failures, slot.served = None, 0, not slot.retiring
                slot.state = InstanceState.DRAINING if slot.retiring else InstanceState.READY
            progress(InstanceEvent(self.name, instance_id, slot.state, time.monotonic() - began, slot.error, gpus,
                                   slot.engine.node))

    async def wait_idle(self) -> None:
        """Return once no request is running here (the model takes none while unloading)."""
        while self._streams:
            await asyncio.sleep(IDLE_POLL_S)

    async def shutdown(self) -> None:
        if self._incoming is not None and not self._incoming.outcome.done():
            self._incoming.outcome.set_result("the model was shut down")
        for task in [self._control, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._stops, *(self._stop_instance(s) for s in self._instances.values()))
        for instance_id in self._instances:
            self._gpus.release(f"{self.name}/{instance_id}")

    def _remove_and_stop(self, instance_id: str) -> None:
        """Take an instance out of the model now and stop its engine in the background (a
        shutdown waits for that stop instead of cancelling it: the engine must not outlive it)."""
        task = asyncio.create_task(self._stop_instance(self._remove(instance_id)))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    @staticmethod
    async def _stop_instance(slot: _Instance) -> None:
        try:
            await slot.engine.shutdown()
        except Exception:  # noqa: BLE001 - shutting down the rest matters more
            logger.exception("error while stopping an instance")
        if slot.state is not InstanceState.FAILED:
            slot.state = InstanceState.STOPPED

    # --- state --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return any(s.state is InstanceState.READY and s.engine.alive for s in self._instances.values())

    def instance_state(self, slot: _Instance) -> InstanceState:
        if slot.state is InstanceState.READY and not slot.engine.alive:
            return InstanceState.FAILED
        return slot.state

    def views(self) -> list[InstanceView]:
        return [v for i, s in self._instances.items() if (v := s.view(i)) is not None]

    def reports(self) -> list[InstanceReport]:
        views = {v.instance_id: v for v in self.views()}
        priority = self.config.scheduler.priority
        return [
            InstanceReport(
                model=self.name,
                instance_id=i,
                state=self.instance_state(s).value,
                snapshot=s.engine.latest_snapshot,
                freeness=freeness(views[i], priority) if i in views else None,
                gpus=s.placement.gpus,
                node=s.engine.node,
            )
            for i, s in self._instances.items()
        ]

    def unavailable_reason(self) -> str:
        """Why no instance serves (empty while one does)."""
        if self.ready:
            return ""
        errors = self.instance_errors()
        states = "; ".join(f"instance {i}: {self.instance_state(s).value}" + (f" ({errors[i]})" if i in errors else "")
                           for i, s in self._instances.items())
        return f"no instance serves: {states or 'none configured'}"

    @property
    def rescheduling_active(self) -> bool:
        """The control loop reschedules (it is on in the config and there are instances to pair)."""
        return (self._control is not None and self.config.scheduler.migration.rescheduling
                and len(self._instances) > 1)

    def migrations_in_flight(self) -> dict[str, int]:
        """Migrations each instance takes part in now (as source or destination)."""
        return {i: n for i, n in self._migrations_at.items() if n > 0}

    def instance_errors(self) -> dict[str, str]:
        """Why each failed instance failed, by instance id (the engine's own account until the
        control loop has seen the failure)."""
        return {i: error for i, s in self._instances.items() if (error := s.error or s.engine.failure)}

    # --- requests -----------------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raise `RequestError` naming the field if the request cannot be served as asked."""
        if self.runtime.embeds:
            raise RequestError(f"model {self.name!r} is an embedding model (its engine runs a pooling task); "
                               "use /v1/embeddings", "model")
        self._check_priority(request.priority)
        self.check_prompt(request.prompt_token_ids)
        n_prompt = len(request.prompt_token_ids)
        limit = self.runtime.max_model_len
        max_tokens = request.max_tokens
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise RequestError(
                f"max_tokens={max_tokens} plus the prompt's {n_prompt} tokens exceeds this model's "
                f"maximum context length of {limit} tokens",
                "max_tokens",
            )
        check_limits(request.sampling, self.config.frontend.limits)
        self.runtime.check_sampling(request.sampling)

    def _check_priority(self, priority: int) -> None:
        prio = self.config.scheduler.priority
        if not prio.min <= priority <= prio.max:
            raise RequestError(f"priority must be between {prio.min} and {prio.max}, got {priority}", "priority")

    def check_prompt(self, token_ids: Sequence[int]) -> None:
        """Raise `RequestError` if these prompt tokens cannot be served (also called as each
        prompt of a batch is tokenised, so that a bad one stops the work on the rest)."""
        if not token_ids:
            raise RequestError("the prompt is empty", "prompt")
        self.check_token_ids(token_ids, "prompt")
        limit = self.runtime.max_model_len
        if len(token_ids) >= limit:
            raise RequestError(
                f"the prompt has {len(token_ids)} tokens; this model's maximum context length is {limit} tokens",
                "prompt")

    def check_token_ids(self, token_ids: Sequence[int], field: str) -> None:
        vocab = self.runtime.vocab_size
        if vocab is not None:
            bad = next((t for t in token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(f"{field} token id {bad} is outside the vocabulary (0 to {vocab - 1})", field)

    def _dispatch(self, request: GenerationRequest | EmbeddingRequest) -> str:
        policy = self.config.scheduler.dispatch_policy
        choice = choose_instance(policy, self.views(), self.config.scheduler.priority, self._last_choice)
        self._last_choice = choice
        self._metrics.dispatch.labels(self.name, choice, policy.value).inc()
        return choice

    async def generate(self, request: GenerationRequest,
                       group: ChoiceGroup | None = None) -> AsyncIterator[GenerationDelta]:
        """Dispatch the request and stream its output. Closing the stream aborts it. If its
        instance is lost, the request continues on another one (`_replay`). `group`: the
        choices of one prompt it is one of, counted together (vLLM's `n`).

        Raises `RequestError` for a bad request and `NoInstanceAvailable` when no instance
        accepts work, both before anything is streamed; `EngineDead` if its instance was lost
        and no other could take it over.
        """
        instance_id = self._accept(request, self.check)
        n_prompt = len(request.prompt_token_ids)
        self._track_in_flight(request, instance_id)
        stream = RequestStream(request, instance_id,
                               new_detokenizer=lambda: self.runtime.new_detokenizer(request.prompt_token_ids,
                                                                                   request.sampling))
        self._streams[request.request_id] = stream
        if request.bound_to_its_engine:
            self._bound.add(request.request_id)
        reads_prefix_cache = self._instances[instance_id].runtime.caches_prefixes and request.reads_prefix_cache
        tracker = RequestTracker(self._metrics, self.stats, self.name, instance_id, request, n_prompt,
                                  reads_prefix_cache, request.max_tokens or self.runtime.max_model_len - n_prompt,
                                  group)

        def moved(old: str, new: str) -> None:
            self._moved(request, old, new)
            tracker.moved()

        running: GenerationRequest | None = request  # as the current instance runs it
        self._waiting.add(request.request_id)
        try:
            while running is not None:
                source = self._instances[stream.instance_id].engine.generate(running)
                try:
                    async for delta in relay(stream, source, on_switch=moved):
                        if stream.ended_by is not None and delta.finish_reason == "abort":
                            raise stream.ended_by
                        if delta.token_ids:
                            self._waiting.discard(request.request_id)
                        tracker.observe(delta)
                        yield delta
                    return
                except EngineDead as lost:
                    running = await self._replay(stream, lost)
                    tracker.moved()
            finished = GenerationDelta((), "", finish_reason="length")  # it had used up its budget
            tracker.observe(finished)
            yield finished
        except EngineDead:
            tracker.outcome = "error"
            raise
        except RequestTimedOut:
            tracker.outcome = "timeout"
            raise
        except ShuttingDown:
            tracker.outcome = "shutdown"
            raise
        except BaseException:
            tracker.outcome = "aborted" if tracker.outcome is None else tracker.outcome
            raise
        finally:
            self._waiting.discard(request.request_id)
            self._bound.discard(request.request_id)
            del self._streams[request.request_id]
            self._instances[stream.instance_id].untrack(request.request_id)
            tracker.finish(stream.instance_id)

    async def embed(self, request: EmbeddingRequest, arrival: float) -> list[float]:
        """The request's embedding from one of the instances, dispatched as a generation is. If
        the instance is lost, another computes it (it is one pass over the prompt).

        Raises `RequestError`, `NoInstanceAvailable`, `Overloaded` and `ShuttingDown` before any
        work; `EngineDead` when no instance could compute it."""
        instance_id = self._accept(request, self._check_embedding)
        labels, outcome = (self.name, instance_id), "aborted"  # (it counts where it was dispatched)
        health = self.config.scheduler.health
        deadline = time.monotonic() + health.replay_timeout_s
        try:
            while True:
                slot = self._instances[instance_id]
                self._track_in_flight(request, instance_id)
                try:
                    embedding = await slot.engine.embed(request)
                    outcome = "success"
                    return embedding
                except EngineDead as dead:
                    if not health.replay:
                        raise
                    lost = dead
                finally:
                    slot.untrack(request.request_id)
                instance_id = await self._dispatch_before(deadline, request, lost)
        except RequestError:
            outcome = "rejected"
            raise
        except EngineDead:
            outcome = "error"
            raise
        finally:
            m = self._metrics
            m.requests.labels(*labels, outcome).inc()
            m.prompt_tokens.labels(*labels).inc(len(request.prompt_token_ids))
            m.request_prompt_tokens.labels(*labels).observe(len(request.prompt_token_ids))
            if outcome == "success":
                m.e2e.labels(*labels).observe(time.monotonic() - arrival)
            self.stats.record(outcome == "success", time.monotonic() - arrival, None)

    def _check_embedding(self, request: EmbeddingRequest) -> None:
        if not self.runtime.embeds:
            raise RequestError(f"model {self.name!r} generates text; /v1/embeddings needs a model whose engine "
                               "runs a pooling task (engine.runner: pooling, and engine.convert: embed for a "
                               "generative architecture)", "model")
        self._check_priority(request.priority)
        self.check_prompt(request.prompt_token_ids)
        self.runtime.check_embedding(request)

    def _accept(self, request: GenerationRequest | EmbeddingRequest, check: Callable) -> str:
        """A new request checked (`check(request)`), admitted and dispatched: the instance it
        goes to. A refusal is counted, by why, and raised."""
        try:
            check(request)
            self._admit()
            return self._dispatch(request)
        except (RequestError, NoInstanceAvailable):
            self._metrics.requests.labels(self.name, "none", "rejected").inc()
            raise
        except (Overloaded, ShuttingDown) as refused:
            outcome = "overloaded" if isinstance(refused, Overloaded) else "shutdown"
            self._metrics.requests.labels(self.name, "none", outcome).inc()
            if isinstance(refused, Overloaded):
                self._metrics.admission_rejections.labels(self.name, "max_num_queued_reqs").inc()
            raise

    async def _dispatch_before(self, deadline: float, request: GenerationRequest | EmbeddingRequest,
                               lost: EngineDead, stream: RequestStream | None = None) -> str:
        """An instance to take over a request whose instance was `lost`, waiting until `deadline`
        for one (another may be restarting); `EngineDead` if none is there by then. A streamed
        request ended meanwhile (a timeout, the shutdown) stops the wait with why it ended."""
        while True:
            try:
                return self._dispatch(request)
            except NoInstanceAvailable:
                if stream is not None and stream.ended_by is not None:
                    raise stream.ended_by from lost
                if time.monotonic() >= deadline:
                    raise EngineDead(f"{lost}; no instance of model {self.name!r} could take over its requests "
                                     f"within {self.config.scheduler.health.replay_timeout_s:g} s") from lost
                await asyncio.sleep(IDLE_POLL_S)

    def _admit(self) -> None:
        """Raise `ShuttingDown` once the server stops, and `Overloaded` if the model already has
        as many requests waiting as it may."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        admission = self.config.scheduler.admission
        limit = admission.max_waiting_requests
        if limit is not None and len(self._waiting) >= limit:
            raise Overloaded(f"model {self.name!r} has {len(self._waiting)} requests waiting for their first "
                             f"token, its limit (scheduler.admission.max_waiting_requests)", admission.retry_after_s)

    async def _replay(self, stream: RequestStream, lost: EngineDead) -> GenerationRequest | None:
        """Continue a request whose instance was lost on another instance: its prompt plus the
        tokens the client has received, recomputed there. Waits up to `replay_timeout_s` for an
        instance to take it (one may be restarting); re-raises `lost` if none does, or if
        replay is off. None if the request had nothing left to generate."""
        health = self.config.scheduler.health
        if not health.replay:
            raise lost
        stream.handover = None  # a migration in flight ended with the source (the relay concluded it)
        lost_on, request = stream.instance_id, stream.request
        if request.bound_to_its_engine:
            raise EngineDead(f"{lost}; request {request.request_id} cannot continue on another instance: "
                             f"{request.bound_to_its_engine}") from lost
        tokens = request.prompt_token_ids + tuple(stream.generated)
        if (request.max_tokens is not None and len(stream.generated) >= request.max_tokens) or \
                len(tokens) >= self.runtime.max_model_len:
            return None
        continuation = request.continued(tokens)
        instance_id = await self._dispatch_before(time.monotonic() + health.replay_timeout_s, continuation, lost, stream)
        self._instances[lost_on].untrack(request.request_id)
        self._track_in_flight(continuation, instance_id)
        stream.instance_id = instance_id
        stream.switched()
        self._metrics.replays.labels(self.name, lost_on, instance_id).inc()
        logger.warning("model %s: request %s continues on instance %s after %d tokens (%s)", self.name,
                       request.request_id, instance_id, len(stream.generated), lost)
        return continuation

    def _track_in_flight(self, request: GenerationRequest | EmbeddingRequest, instance_id: str) -> None:
        """Count the request against the instance until it shows in the instance's snapshots."""
        slot = self._instances[instance_id]
        block_size = (slot.engine.latest_snapshot or InstanceSnapshot(0, 0, DEFAULT_BLOCK_SIZE)).block_size
        n_tokens = len(request.prompt_token_ids)
        slot.track(RequestLoad(request.request_id, request.priority, n_tokens, 0, blocks_for(n_tokens, block_size)))

    def _moved(self, request: GenerationRequest, old: str, new: str) -> None:
        self._instances[old].untrack(request.request_id)
        self._track_in_flight(request, new)

    # --- migration ----------------------------------------------------------------------------

    async def migrate(self, request_id: str, destination_id: str,
                      stage_timeout_s: float | None = None) -> MigrationReport:
        """Move a running request to another instance while it decodes (Llumnix live migration).
        `stage_timeout_s`: this migration's, instead of the model's `migration.stage_timeout_s`.

        Raises `MigrationRejected` (nothing moved) for an unknown request or destination, the
        request's own instance, a destination that takes no work or lacks room, or a request
        already migrating. Otherwise returns the report: committed, or aborted with the reason
        (the request then goes on on its source).
        """
        stream = self._streams.get(request_id)
        if stream is None:
            raise MigrationRejected(Refusal.NOT_FOUND, f"no running request {request_id!r} in model {self.name!r}")
        if stream.handover is not None or request_id in self._migrating:
            raise MigrationRejected(Refusal.CONFLICT, f"request {request_id!r} is already migrating")
        bound = stream.request.bound_to_its_engine
        if bound:
            raise MigrationRejected(Refusal.CONFLICT, f"request {request_id!r} cannot move: {bound}")
        views = {v.instance_id: v for v in self.views()}
        num_tokens = len(stream.request.prompt_token_ids) + len(stream.generated)
        check_destination(views, stream.instance_id, destination_id, num_tokens)
        destination = self._instances[destination_id]
        snapshot = views[destination_id].snapshot
        source_id = stream.instance_id
        difference = destination.runtime.kv_layout_difference(self._instances[source_id].runtime)
        if difference is not None:
            raise MigrationRejected(Refusal.INVALID, f"instance {destination_id!r} cannot continue requests of "
                                                     f"instance {source_id!r}: {difference}")
        self._migrating.add(request_id)
        self._migrations_at.update((source_id, destination_id))
        self._metrics.migrations_started.labels(self.name, source_id, destination_id).inc()
        settings = self.config.scheduler.migration
        if stage_timeout_s is not None:
            settings = settings.model_copy(update={"stage_timeout_s": stage_timeout_s})
        try:
            report = await migrate_request(
                stream, self._instances[source_id].engine, destination.engine, destination.runtime,
                settings, snapshot.block_size, snapshot.block_bytes,
            )
        finally:
            self._migrating.discard(request_id)
            self._migrations_at.subtract((source_id, destination_id))
        self._metrics.record_migration(self.name, report)
        return report

    def _slot(self, instance_id: str) -> _Instance:
        if instance_id not in self._instances:
            raise MigrationRejected(Refusal.NOT_FOUND, f"model {self.name!r} has no instance {instance_id!r}")
        return self._instances[instance_id]

    def drain(self, instance_id: str) -> None:
        """Take an instance out of dispatch; rescheduling migrates its requests away."""
        slot = self._slot(instance_id)
        if slot.state not in (InstanceState.READY, InstanceState.DRAINING):
            raise MigrationRejected(Refusal.INVALID, f"instance {instance_id!r} is {slot.state.value}, not serving")
        others = [i for i, s in self._instances.items()
                  if i != instance_id and s.state is InstanceState.READY and s.engine.alive]
        if slot.state is InstanceState.READY and not others:
            raise MigrationRejected(Refusal.CONFLICT, f"instance {instance_id!r} is the last one serving model "
                                                      f"{self.name!r}: draining it would leave the model unavailable")
        slot.state = InstanceState.DRAINING

    def resume(self, instance_id: str) -> None:
        """Undo `drain`: the instance takes new requests again."""
        slot = self._slot(instance_id)
        if slot.retiring:
            raise MigrationRejected(Refusal.CONFLICT, f"instance {instance_id!r} is being retired: model "
                                                      f"{self.name!r}'s config no longer has it")
        if slot.state is not InstanceState.DRAINING:
            raise MigrationRejected(Refusal.INVALID, f"instance {instance_id!r} is {slot.state.value}, not draining")
        slot.state = InstanceState.READY

    # --- the control loop ---------------------------------------------------------------------

    async def _control_loop(self) -> None:
        """Every interval, plan from the instances' health and load and carry the plan out."""
        while True:
            await asyncio.sleep(self.config.scheduler.migration.interval_s)  # settings may change
            try:
                self._carry_out(self._plan())
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                logger.exception("model %s: control loop tick failed", self.name)

    async def _tick_now(self) -> None:
        """One tick now, returning once the instances it starts have started (or failed)."""
        await asyncio.gather(*self._carry_out(self._plan()))

    def _plan(self) -> ControlPlan:
        hosting, incoming = self._hosting(), self._incoming
        health = [s.health(i, self._migrations_at[i] > 0, s.runtime is self.runtime,
                           incoming is not None and s.runtime is incoming.runtime, i in hosting)
                  for i, s in self._instances.items()]
        return plan_tick(health, self.views(), self.config.scheduler, self.config.instances, self._migrations_at,
                         frozenset(self._migrating | self._bound), time.monotonic(),
                         None if incoming is None else incoming.source.config.instances)

    def _carry_out(self, plan: ControlPlan) -> list[asyncio.Task]:
        """Carry the plan out; returns the starts of the instances it added (they run on)."""
        self._end_overdue_requests()
        incoming = self._incoming  # (the engines started below, if it asks for some)
        if plan.switch:
            self._switch_to_incoming()
        elif plan.give_up:
            self._give_up_incoming()
        for lost in plan.lost:
            self._lose_instance(lost.instance_id, lost.reason)
        for instance_id in plan.restart:
            self._spawn(self._restart_instance(instance_id))
        self._retire_instances(plan.retire)
        for instance_id in plan.evict:
            self._instances[instance_id].engine.abandon("retired: its requests did not leave within "
                                                        "health.drain_timeout_s")
        for instance_id in plan.stop:
            self._remove_and_stop(instance_id)
        for migration in plan.migrations:
            self._spawn(self._planned_migration(migration))
        starts = self._starts
        if starts is None:
            return []
        added = [self._add_instance(self.runtime, self.source) for _ in range(plan.start)]
        if incoming is not None:
            added += [self._add_instance(incoming.runtime, incoming.source) for _ in range(plan.start_incoming)]
        return [self._spawn(self._start_instance(i, starts)) for i in added]

    def _end_overdue_requests(self) -> None:
        """Abort the requests running past the model's request timeout (their streams then end
        with `RequestTimedOut`)."""
        timeout = self.config.scheduler.admission.request_timeout_s
        if timeout is None:
            return
        now = time.monotonic()
        for stream in self._streams.values():
            arrived = stream.request.arrival_time
            if stream.ended_by is None and arrived and now - arrived > timeout:
                self._end(stream, RequestTimedOut(f"request {stream.request.request_id} ran past model "
                                                  f"{self.name!r}'s scheduler.admission.request_timeout_s and "
                                                  "was aborted"))

    def _end(self, stream: RequestStream, why: Exception) -> None:
        """Abort a running request; its stream then ends with `why`."""
        stream.ended_by = why
        slot = self._instances.get(stream.instance_id)
        if slot is not None and slot.engine.alive:
            self._spawn(slot.engine.abort(stream.request.request_id))

    def begin_shutdown(self, grace_s: float) -> None:
        """Take no new requests; end those still running after `grace_s` with `ShuttingDown`."""
        self._closing = True

        def end_the_rest() -> None:
            for stream in list(self._streams.values()):
                if stream.ended_by is None:
                    self._end(stream, ShuttingDown(f"the server shut down before request "
                                                   f"{stream.request.request_id} finished"))

        asyncio.get_running_loop().call_later(grace_s, end_the_rest)

    def _spawn(self, work: Awaitable) -> asyncio.Task:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _lose_instance(self, instance_id: str, reason: str) -> None:
        """Take a dead or hung instance out of service: its streams end with `EngineDead` (and
        replay elsewhere), and its engine is stopped; the plan restarts it later."""
        slot = self._instances[instance_id]
        logger.error("model %s instance %s is lost: %s", self.name, instance_id, reason)
        if slot.state is InstanceState.DRAINING:
            slot.served = False  # drained to be retired or stopped: not brought back
        slot.state, slot.error = InstanceState.FAILED, reason
        slot.failures += 1
        slot.down_since = time.monotonic()
        slot.engine.abandon(reason)
        self._metrics.instance_failures.labels(self.name, instance_id).inc()
        slot.busy = True
        self._spawn(self._stop_lost(slot))

    async def _stop_lost(self, slot: _Instance) -> None:
        try:
            await self._stop_instance(slot)
        finally:
            slot.busy = False

    async def _restart_instance(self, instance_id: str) -> None:
        slot = self._instances[instance_id]
        slot.busy = True
        try:
            slot.renew(slot.runtime.create_instance(instance_id, slot.placement))
            self._metrics.instance_restarts.labels(self.name, instance_id).inc()
            logger.warning("model %s: restarting instance %s (failure %d in a row)", self.name, instance_id,
                           slot.failures)
            assert self._starts is not None
            await self._start_instance(instance_id, self._starts)
            if slot.state is InstanceState.FAILED:
                slot.failures += 1
                slot.down_since = time.monotonic()
        finally:
            slot.busy = False

    async def _planned_migration(self, plan: PlannedMigration) -> None:
        try:
            report = await self.migrate(plan.request_id, plan.destination)
        except MigrationRejected as exc:  # the snapshots moved on since the plan: fine
            logger.debug("planned migration of %s not started: %s", plan.request_id, exc)
            return
        if not report.committed:
            logger.info("migration of %s from %s to %s aborted: %s", plan.request_id, plan.source,
                        plan.destination, report.reason)


async def _reporting(work: Awaitable[T], every_s: float, report: Callable[[], None]) -> T:
    """Await `work`, calling `report` every `every_s` seconds until it is done. Cancelling
    this cancels `work` and waits for it to wind down (an engine start stops its engine)."""
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=every_s))[0]:
            report()
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    return task.result()
