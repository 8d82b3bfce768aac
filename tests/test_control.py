"""The control loop's planner (`policies.control.plan_tick`): lost instances, restarts with
backoff, and rescheduling only among instances that serve, on described instances with an
injected clock."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.config import HealthSettings, MigrationSettings, SchedulerSettings
from llumnix_backend.plugin import InstanceState
from llumnix_backend.policies.control import InstanceHealth, plan_tick, restart_backoff
from llumnix_backend.served_model import _Instance
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, RequestLoad

NOW = 1000.0
HEALTH = HealthSettings(stale_after_s=5, restart_backoff_s=1, max_restart_backoff_s=8)
SETTINGS = SchedulerSettings(health=HEALTH, migration=MigrationSettings(rescheduling=False))


def health(instance_id: str = "0", state: InstanceState = InstanceState.READY, alive: bool = True,
           last_report_at: float | None = NOW, **kw) -> InstanceHealth:
    return InstanceHealth(instance_id, state, alive, last_report_at, served=kw.pop("served", True), **kw)


def plan(*instances: InstanceHealth, settings: SchedulerSettings = SETTINGS, views=(), now: float = NOW,
         target: int | None = None):
    """The plan for these instances; by default the config asks for as many members as there are."""
    target = sum(i.member for i in instances) if target is None else target
    return plan_tick(instances, views, settings, target, {}, frozenset(), now)


def test_a_healthy_instance_needs_nothing() -> None:
    assert plan(health()).lost == () and plan(health()).restart == ()


def test_a_dead_engine_is_lost_with_its_own_reason() -> None:
    (lost,) = plan(health(alive=False, failure="the engine process was killed by SIGKILL")).lost
    assert lost.instance_id == "0" and "SIGKILL" in lost.reason


def test_an_engine_that_stops_reporting_is_lost_as_hung() -> None:
    assert plan(health(last_report_at=NOW - 4.9)).lost == ()
    (lost,) = plan(health(last_report_at=NOW - 5.1)).lost
    assert "hung" in lost.reason and "5.1 s" in lost.reason


def test_an_engine_whose_step_hangs_is_lost_though_its_heartbeat_goes_on() -> None:
    """The heartbeat keeps the reports fresh (last_report_at now); no step has landed for 5.1 s
    while requests run."""
    assert plan(health(stepped_at=NOW - 4.9)).lost == ()
    (lost,) = plan(health(stepped_at=NOW - 5.1)).lost
    assert "finished no step for 5.1 s" in lost.reason and "hung" in lost.reason


def test_a_step_report_is_told_from_a_heartbeat_by_its_sequence() -> None:
    """What the model feeds the planner: when the engine's snapshot sequence last moved (a
    heartbeat re-sends the same one with a fresh arrival time), only while requests run and no
    migration holds the engine's steps up."""
    def snapshot(sequence: int, running: int = 1) -> InstanceSnapshot:
        loads = tuple(RequestLoad(f"r{i}", 0, 10, 1, 0, True) for i in range(running))
        return InstanceSnapshot(100, running, 16, running=loads, sequence=sequence)

    engine = SimpleNamespace(latest_snapshot=snapshot(1), last_report_at=10.0, alive=True, failure=None)
    slot = _Instance(engine, runtime=None)
    assert slot.health("0", migrating=False).stepped_at == 10.0
    engine.last_report_at = 12.0  # a heartbeat: the same step report
    assert slot.health("0", migrating=False).stepped_at == 10.0
    engine.latest_snapshot, engine.last_report_at = snapshot(2), 13.0
    assert slot.health("0", migrating=False).stepped_at == 13.0
    assert slot.health("0", migrating=True).stepped_at is None
    engine.latest_snapshot = snapshot(3, running=0)  # idle: nothing to step
    assert slot.health("0", migrating=False).stepped_at is None


def test_an_instance_being_started_or_stopped_is_left_alone() -> None:
    assert plan(health(alive=False, busy=True)).lost == ()
    assert plan(health(state=InstanceState.STARTING, alive=False, last_report_at=None)).lost == ()
    assert plan(health(state=InstanceState.FAILED, down_since=0.0, failures=1, busy=True)).restart == ()


def test_a_failed_instance_that_served_restarts_after_its_backoff() -> None:
    failed = dict(state=InstanceState.FAILED, alive=False, failures=3)  # backoff 1, 2, 4 s
    assert plan(health(down_since=NOW - 3.9, **failed)).restart == ()
    assert plan(health(down_since=NOW - 4.0, **failed)).restart == ("0",)


def test_an_instance_that_never_started_is_not_restarted() -> None:
    never = health(state=InstanceState.FAILED, alive=False, served=False, failures=1, down_since=0.0)
    assert plan(never).restart == ()


def test_restarts_can_be_turned_off() -> None:
    settings = SETTINGS.model_copy(update={"health": HEALTH.model_copy(update={"restart": False})})
    failed = health(state=InstanceState.FAILED, alive=False, failures=1, down_since=0.0)
    assert plan(failed, settings=settings).restart == ()


@given(st.integers(min_value=1, max_value=64))
def test_the_backoff_doubles_up_to_its_ceiling(failures: int) -> None:
    backoff = restart_backoff(failures, HEALTH)
    assert backoff == min(8, 2 ** (failures - 1))
    assert restart_backoff(failures + 1, HEALTH) >= backoff


def _view(instance_id: str, free: int, requests: int) -> InstanceView:
    running = tuple(RequestLoad(f"{instance_id}-{k}", 0, 160, 10, 0, decoding=True) for k in range(requests))
    snapshot = InstanceSnapshot(total_blocks=100, used_blocks=100 - free, block_size=16, running=running)
    return InstanceView(instance_id, snapshot)


def test_rescheduling_leaves_lost_instances_out() -> None:
    settings = SETTINGS.model_copy(update={"migration": MigrationSettings()})
    views = [_view("0", free=0, requests=10), _view("1", free=90, requests=1)]
    # Instance 0 is overloaded and instance 1 free: a migration from 0 to 1...
    moves = plan(health("0"), health("1"), settings=settings, views=views).migrations
    assert [(m.source, m.destination) for m in moves][:1] == [("0", "1")]
    # ...but not once the destination is lost, nor from a lost source.
    assert plan(health("0"), health("1", alive=False), settings=settings, views=views).migrations == ()
    assert plan(health("0", last_report_at=0.0), health("1"), settings=settings, views=views).migrations == ()


@given(st.lists(st.tuples(st.sampled_from(list(InstanceState)), st.booleans(), st.floats(0, 100),
                          st.booleans(), st.integers(0, 5), st.booleans()), max_size=6))
def test_no_instance_is_both_lost_and_restarted(rows) -> None:
    instances = [InstanceHealth(str(i), state, alive, NOW - age, served, failures, NOW - 100, busy)
                 for i, (state, alive, age, served, failures, busy) in enumerate(rows)]
    result = plan(*instances)
    lost = {x.instance_id for x in result.lost}
    assert not lost & set(result.restart)
    by_id = {i.instance_id: i for i in instances}
    assert all(by_id[i].state in (InstanceState.READY, InstanceState.DRAINING) for i in lost)
    assert all(by_id[i].state is InstanceState.FAILED and by_id[i].served for i in result.restart)


# --- the instance count and retirement ----------------------------------------------------------

def test_fewer_members_than_the_config_asks_for_are_topped_up() -> None:
    assert plan(health("0"), target=3).start == 2
    # A failed member counts (it restarts, or waits for a config edit): nothing is added for it.
    assert plan(health("0"), health("1", state=InstanceState.FAILED, alive=False, served=False), target=2).start == 0
    # Instances being retired, or running the engines a reload replaces, are not members.
    assert plan(health("0"), health("1", retire_by=NOW + 5), target=2).start == 1
    assert plan(health("0", current=False), target=1).start == 1


def test_the_surplus_retired_is_failed_members_first_then_the_newest() -> None:
    members = [health("0"), health("1"), health("2", state=InstanceState.FAILED, alive=False), health("10")]
    assert plan(*members, target=3).retire == ("2",)
    assert plan(*members, target=2).retire == ("2", "10")
    assert plan(*members, target=4).retire == () and plan(*members, target=4).start == 0


def test_a_retired_instance_stops_once_empty_and_is_evicted_at_its_deadline() -> None:
    retiring = dict(state=InstanceState.DRAINING, retire_by=NOW + 1)
    assert plan(health("0", **retiring), target=0).stop == ("0",)
    hosting = plan(health("0", hosts_requests=True, **retiring), target=0)
    assert hosting.stop == () and hosting.evict == ()
    overdue = plan(health("0", hosts_requests=True, **retiring), target=0, now=NOW + 1)
    assert overdue.evict == ("0",) and overdue.stop == ()
    # Nothing is stopped under a start or a stop of its engine: it is stopped once that is over.
    assert plan(health("0", busy=True, **retiring), target=0).stop == ()
    assert plan(health("0", **{**retiring, "state": InstanceState.STARTING}), target=0).stop == ()


def test_a_retired_instance_is_never_restarted() -> None:
    failed = health("0", state=InstanceState.FAILED, alive=False, failures=1, down_since=0.0, retire_by=NOW)
    assert plan(failed, target=0).restart == ()


@given(st.lists(st.tuples(st.sampled_from(list(InstanceState)), st.booleans(), st.booleans(), st.booleans(),
                          st.booleans()), max_size=8), st.integers(0, 8))
def test_the_count_plan_meets_the_target_and_touches_only_members(rows, target: int) -> None:
    instances = [health(str(i), state, alive=alive, current=current, hosts_requests=hosting,
                        retire_by=NOW if retiring else None)
                 for i, (state, alive, current, retiring, hosting) in enumerate(rows)]
    result = plan(*instances, target=target)
    members = {i.instance_id for i in instances if i.member}
    assert set(result.retire) <= members
    assert len(members) - len(result.retire) + result.start == target
    assert not set(result.stop) & members and not set(result.evict) & members
    assert not set(result.stop) & set(result.evict)


def test_a_replacement_starts_the_new_count_then_switches_once_one_serves() -> None:
    old = [health("0"), health("1")]
    new = dict(current=False, incoming=True)
    first = plan_tick(old, (), SETTINGS, 2, {}, frozenset(), NOW, incoming_target=3)
    assert first.start_incoming == 3 and not first.switch and not first.give_up
    starting = [health(str(k), state=InstanceState.STARTING, alive=False, last_report_at=None, served=False, **new)
                for k in (2, 3, 4)]
    waiting = plan_tick(old + starting, (), SETTINGS, 2, {}, frozenset(), NOW, incoming_target=3)
    assert waiting.start_incoming == 0 and not waiting.switch and not waiting.give_up
    one_up = [health("2", **new), *starting[1:]]
    switched = plan_tick(old + one_up, (), SETTINGS, 2, {}, frozenset(), NOW, incoming_target=3)
    assert switched.switch and switched.start == 0 and switched.retire == ()


def test_a_replacement_whose_every_instance_failed_to_start_is_given_up() -> None:
    failed = [health(str(k), state=InstanceState.FAILED, alive=False, served=False, current=False, incoming=True)
              for k in (2, 3)]
    result = plan_tick([health("0"), *failed], (), SETTINGS, 1, {}, frozenset(), NOW, incoming_target=2)
    assert result.give_up and not result.switch and result.restart == ()
    # Without a replacement under way, nothing of the kind is planned.
    assert not plan(health("0")).give_up and plan(health("0")).start_incoming == 0
