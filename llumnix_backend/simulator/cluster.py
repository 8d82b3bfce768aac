"""The simulated model: instances, the dispatcher and the rescheduler, driven by events.

Events are arrivals (dispatched at once by `choose_instance` over the instances' snapshots),
step ends (each busy instance steps back to back), rescheduling ticks (every `interval_s`,
`plan_migrations` over the snapshots) and migration switches. A migration runs for the time the
profile gives while its request keeps decoding on the source; at the switch, which waits for
the source's step to end as the real final stage does, the destination takes the request over
if it still has room (the request then pauses for the profile's downtime), or the migration is
abandoned and the request stays where it was.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from llumnix_backend.config import SchedulerSettings
from llumnix_backend.policies.dispatch import choose_instance
from llumnix_backend.policies.rescheduling import PlannedMigration, plan_migrations
from llumnix_backend.simulator.instance import SimRequest, SimulatedInstance
from llumnix_backend.simulator.profile import EngineProfile
from llumnix_backend.snapshot import InstanceView

_ARRIVAL, _STEP_END, _RESCHEDULE, _SWITCH = range(4)


class WorkloadItem(Protocol):
    """One request of a workload (the benchmarks' `workloads.Request` is one)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int


@dataclass
class SimulationResult:
    requests: list[SimRequest]
    rejected: int  # requests longer than an instance can ever hold
    num_preemptions: int
    migrations: Counter = field(default_factory=Counter)  # committed / aborted
    sim_time_s: float = 0.0


@dataclass
class _Migration:
    plan: PlannedMigration
    request: SimRequest


class Simulation:
    def __init__(self, profile: EngineProfile, num_instances: int, scheduler: SchedulerSettings) -> None:
        self.profile = profile
        self.scheduler = scheduler
        self.instances = {str(i): SimulatedInstance(str(i), profile) for i in range(num_instances)}
        self._events: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self._last_choice: str | None = None
        self._in_flight: Counter[str] = Counter()
        self._migrating: set[str] = set()
        self._where: dict[str, SimulatedInstance] = {}  # request id -> instance it runs on
        self._pending_switch: dict[str, list[_Migration]] = {}  # source id -> switches waiting for its step
        self._migrations: Counter[str] = Counter()
        self._unfinished = 0
        self.now = 0.0

    def _push(self, at: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (at, next(self._order), kind, payload))

    def run(self, workload: Iterable[WorkloadItem], max_sim_time_s: float = 3600.0) -> SimulationResult:
        """Replay the workload until every request finishes (or `max_sim_time_s`)."""
        capacity = self.profile.total_blocks * self.profile.block_size
        requests, rejected = [], 0
        for i, item in enumerate(workload):
            if item.prompt_tokens + item.output_tokens > capacity or item.prompt_tokens < 1:
                rejected += 1
                continue
            request = SimRequest(f"r{i}", item.arrival_s, item.prompt_tokens, max(1, item.output_tokens),
                                 item.priority)
            requests.append(request)
            self._push(item.arrival_s, _ARRIVAL, request)
        self._unfinished = len(requests)
        if self.scheduler.migration.rescheduling and len(self.instances) > 1:
            self._push(self.scheduler.migration.interval_s, _RESCHEDULE, None)
        while self._events and self._unfinished:
            at, _, kind, payload = heapq.heappop(self._events)
            if at > max_sim_time_s:
                break
            self.now = at
            if kind == _ARRIVAL:
                self._dispatch(payload)
            elif kind == _STEP_END:
                self._step_end(payload)
            elif kind == _RESCHEDULE:
                self._reschedule()
            else:
                self._switch(payload)
        preemptions = sum(i.num_preemptions for i in self.instances.values())
        return SimulationResult(requests, rejected, preemptions, self._migrations, self.now)

    def _views(self) -> list[InstanceView]:
        return [InstanceView(i, inst.snapshot(self.now)) for i, inst in self.instances.items()]

    # --- dispatch and stepping ----------------------------------------------------------------

    def _dispatch(self, request: SimRequest) -> None:
        choice = choose_instance(self.scheduler.dispatch_policy, self._views(), self.scheduler.priority,
                                 self._last_choice)
        self._last_choice = choice
        instance = self.instances[choice]
        self._where[request.request_id] = instance
        instance.add(request)
        self._wake(instance)

    def _wake(self, instance: SimulatedInstance) -> None:
        """Start the instance's next step if it is idle and has something to run now."""
        if instance.busy_until is not None or not instance.has_work:
            return
        duration = instance.start_step(self.now)
        if duration is None:
            # Only paused (just migrated) requests: look again when the first pause ends.
            resume = min((r.paused_until for r in instance.running if r.paused_until > self.now), default=None)
            if resume is not None:
                instance.busy_until = resume
                self._push(resume, _STEP_END, instance)
            return
        instance.busy_until = self.now + duration
        self._push(instance.busy_until, _STEP_END, instance)

    def _step_end(self, instance: SimulatedInstance) -> None:
        for request in instance.finish_step(self.now):
            self._unfinished -= 1
            del self._where[request.request_id]
        for migration in self._pending_switch.pop(instance.instance_id, []):
            self._commit(migration)
        self._wake(instance)

    # --- rescheduling and migration -----------------------------------------------------------

    def _reschedule(self) -> None:
        settings = self.scheduler.migration
        plans = plan_migrations(self._views(), self.scheduler.priority, settings, self._in_flight,
                                frozenset(self._migrating))
        for plan in plans:
            source = self.instances[plan.source]
            request = next(r for r in source.running if r.request_id == plan.request_id)
            self._migrating.add(plan.request_id)
            self._in_flight.update((plan.source, plan.destination))
            self._migrations["started"] += 1
            self._push(self.now + self.profile.migration_time(request.blocks), _SWITCH, _Migration(plan, request))
        if self._unfinished:
            self._push(self.now + settings.interval_s, _RESCHEDULE, None)

    def _switch(self, migration: _Migration) -> None:
        """The final stage: between two of the source's steps."""
        source = self.instances[migration.plan.source]
        if source.busy_until is not None and source.in_current_step(migration.request):
            self._pending_switch.setdefault(source.instance_id, []).append(migration)
        else:
            self._commit(migration)
            self._wake(source)

    def _commit(self, migration: _Migration) -> None:
        plan, request = migration.plan, migration.request
        source, destination = self.instances[plan.source], self.instances[plan.destination]
        self._migrating.discard(plan.request_id)
        self._in_flight.subtract((plan.source, plan.destination))
        still_there = self._where.get(request.request_id) is source and request in source.running
        # Abandoned if the request finished, was preempted, or no longer fits the destination.
        if not (still_there and request.decoding and destination.has_room_for(request)):
            self._migrations["aborted"] += 1
            return
        blocks = request.blocks
        source.remove_running(request)
        destination.take_over(request, self.now + self.profile.downtime(blocks))
        self._where[request.request_id] = destination
        self._migrations["committed"] += 1
        # Only the destination is woken: the source may have more switches to make before its
        # next step (its caller wakes it).
        self._wake(destination)
