"""What a model's control loop does at one tick: a pure function from what it knows of the
instances (their health, their load views, the migrations in flight) and the time to one
`ControlPlan`, which `ServedModel` carries out.

- **Lost instances.** A serving instance whose engine died (`alive` false), sent no load
  report for `health.stale_after_s` (its process stopped), or finished no step for as long
  while requests run on it (its step hung: a stuck kernel or collective, a deadlock; the
  engine's heartbeat thread still reports then) is lost: it gets no new requests, its
  requests continue on other instances (replay), and its engine is stopped.
- **Restarts.** A failed instance that had served is started again once its backoff has
  passed: `restart_backoff_s`, doubling with each failure in a row, at most
  `max_restart_backoff_s`. One that never started stays failed (its settings need fixing,
  and a config edit retries it).
- **The instance count.** The model's members are its instances that run its current engines
  and are not being retired. With fewer than the config's `instances`, the plan starts more;
  with more, it retires the surplus (failed ones first, then the newest). A failed instance
  stays a member: it is restarted, or (if it never started) waits for a config edit.
- **Replacing the engines.** While a reload brings in engines of new settings, the plan starts
  the new config's count of them beside the model's; as soon as one serves, it switches the
  model to them (the old instances retire); if every one of them failed to start, it gives the
  replacement up (they are removed, and the model goes on as it was).
- **Retirement.** A retired instance takes no new requests. Once nothing runs on it, it is
  stopped. Past its drain deadline (`health.drain_timeout_s`), what still runs on it is
  evicted: it continues elsewhere by replay.
- **Rescheduling.** With `migration.rescheduling` on, the migrations `plan_migrations` asks
  for among the instances that serve and are not lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llumnix_backend.config import HealthSettings, SchedulerSettings
from llumnix_backend.plugin import InstanceState
from llumnix_backend.policies.rescheduling import PlannedMigration, plan_migrations
from llumnix_backend.snapshot import InstanceView

SERVING = (InstanceState.READY, InstanceState.DRAINING)


@dataclass(frozen=True)
class InstanceHealth:
    """What the control loop knows of one instance at a tick (times on the loop's clock)."""

    instance_id: str
    state: InstanceState
    alive: bool  # its engine runs and reports no error
    last_report_at: float | None  # when its newest load report arrived; None before the first
    served: bool  # it has served since the model started it: worth restarting
    failures: int = 0  # deaths and failed restarts in a row
    down_since: float | None = None  # when it last failed
    busy: bool = False  # a start or a stop of its engine is under way
    failure: str | None = None  # the engine's own account of why it is not alive, if known
    # While requests run on it (and it takes part in no migration): when its engine's latest
    # step report arrived. None otherwise.
    stepped_at: float | None = None
    current: bool = True  # it runs the model's current engines (not the ones a reload replaces)
    incoming: bool = False  # it runs the engines a reload is bringing in
    retire_by: float | None = None  # being retired: when its requests must have left by
    hosts_requests: bool = False  # requests dispatched to it have not finished

    @property
    def retiring(self) -> bool:
        return self.retire_by is not None

    @property
    def member(self) -> bool:
        """One of the instances that make up the model's count."""
        return self.current and not self.retiring


@dataclass(frozen=True)
class LostInstance:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class ControlPlan:
    lost: tuple[LostInstance, ...] = ()
    restart: tuple[str, ...] = ()
    migrations: tuple[PlannedMigration, ...] = ()
    start: int = 0  # new instances to add and start
    retire: tuple[str, ...] = ()  # members to take out of the model: they drain, then stop
    stop: tuple[str, ...] = ()  # retired instances nothing runs on any more: stop and remove
    evict: tuple[str, ...] = ()  # retired instances past their drain deadline: replay what runs there
    start_incoming: int = 0  # instances of the engines a reload brings in to add and start
    switch: bool = False  # one of those serves: the model switches to them
    give_up: bool = False  # every one of those failed to start: drop them, keep the model as it is


def restart_backoff(failures: int, health: HealthSettings) -> float:
    """Seconds to wait before restarting an instance that failed `failures` times in a row."""
    return min(health.max_restart_backoff_s, health.restart_backoff_s * 2 ** max(0, failures - 1))


def lost_reason(instance: InstanceHealth, health: HealthSettings, now: float) -> str | None:
    """Why a serving instance is lost now, or None if it is not."""
    if instance.state not in SERVING or instance.busy:
        return None
    if not instance.alive:
        return instance.failure or "the engine stopped working"
    if instance.last_report_at is not None and now - instance.last_report_at > health.stale_after_s:
        return f"the engine sent no load report for {now - instance.last_report_at:.1f} s (hung)"
    if instance.stepped_at is not None and now - instance.stepped_at > health.stale_after_s:
        return f"the engine finished no step for {now - instance.stepped_at:.1f} s while requests ran on it (hung)"
    return None


def plan_count(instances: Sequence[InstanceHealth], target: int) -> tuple[int, tuple[str, ...]]:
    """How many instances to start, and which members to retire, for `target` members."""
    members = sorted((i for i in instances if i.member),
                     key=lambda i: (i.state is InstanceState.FAILED, int(i.instance_id)), reverse=True)
    return max(0, target - len(members)), tuple(i.instance_id for i in members[:max(0, len(members) - target)])


def plan_retirement(instances: Sequence[InstanceHealth], now: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Retired instances to stop (nothing runs there, no start or stop under way) and to evict
    (past their deadline with requests still there)."""
    # (one still starting is stopped once it is up: it comes up drained)
    retiring = [i for i in instances if i.retiring and not i.busy and i.state is not InstanceState.STARTING]
    stop = tuple(i.instance_id for i in retiring if not i.hosts_requests)
    evict = tuple(i.instance_id for i in retiring if i.hosts_requests and now >= i.retire_by)
    return stop, evict


def plan_replacement(instances: Sequence[InstanceHealth], target: int) -> tuple[int, bool, bool]:
    """While a reload brings in new engines, `target` of them: how many to start, whether to
    switch to them, whether to give them up."""
    incoming = [i for i in instances if i.incoming and not i.retiring]
    if any(i.state is InstanceState.READY and i.alive for i in incoming):
        return 0, True, False
    start = max(0, target - len(incoming))
    failed = bool(incoming) and all(i.state is InstanceState.FAILED and not i.busy for i in incoming)
    return start, False, failed and not start


def plan_tick(instances: Sequence[InstanceHealth], views: Sequence[InstanceView], settings: SchedulerSettings,
              target_instances: int, migrations_at: Mapping[str, int], migrating: frozenset[str],
              now: float, incoming_target: int | None = None) -> ControlPlan:
    """`target_instances`: the config's count; `incoming_target`: while a reload brings in new
    engines, the new config's count of them (None otherwise)."""
    health = settings.health
    lost = tuple(LostInstance(i.instance_id, reason) for i in instances
                 if (reason := lost_reason(i, health, now)) is not None)
    restart = ()
    if health.restart:
        restart = tuple(i.instance_id for i in instances
                        if i.state is InstanceState.FAILED and i.served and i.member and not i.busy
                        and i.down_since is not None and now >= i.down_since + restart_backoff(i.failures, health))
    migrations: tuple[PlannedMigration, ...] = ()
    if settings.migration.rescheduling:
        usable = {i.instance_id for i in instances if i.state in SERVING and i.alive} - {x.instance_id for x in lost}
        live = [v for v in views if v.instance_id in usable]
        if len(live) > 1:
            migrations = tuple(plan_migrations(live, settings.priority, settings.migration, migrations_at, migrating))
    start_incoming, switch, give_up = (0, False, False) if incoming_target is None else \
        plan_replacement(instances, incoming_target)
    # (a switch or a give-up changes the members: the count waits for the next tick)
    start, retire = (0, ()) if switch or give_up else plan_count(instances, target_instances)
    stop, evict = plan_retirement(instances, now)
    return ControlPlan(lost, restart, migrations, start, retire, stop, evict, start_incoming, switch, give_up)
