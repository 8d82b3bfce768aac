"""The rescheduling policy on snapshots: each trigger moves what it should and nothing else."""

from __future__ import annotations

import dataclasses
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.config import MigrationSettings, PrioritySettings
from llumnix_backend.policies.rescheduling import in_trouble, migration_freeness, plan_migrations
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, RequestLoad

BLOCK = 16
PRIORITY = PrioritySettings(high_below=0, headroom_tokens=32 * BLOCK)
SETTINGS = MigrationSettings(source_below_tokens=10 * BLOCK, destination_above_tokens=30 * BLOCK)


def req(name: str, blocks: int, priority: int = 0, demand: int = 0, decoding: bool = True) -> RequestLoad:
    return RequestLoad(name, priority, blocks * BLOCK, blocks, demand, decoding)


def view(instance_id: str, running=(), waiting=(), total: int = 100, **kw) -> InstanceView:
    used = sum(r.num_blocks for r in running)
    return InstanceView(instance_id, InstanceSnapshot(total, used, BLOCK, running=tuple(running), waiting=tuple(waiting)), **kw)


def test_balanced_instances_stay_put() -> None:
    a = view("a", [req("a1", 20), req("a2", 20)])
    b = view("b", [req("b1", 20), req("b2", 20)])
    assert plan_migrations([a, b], PRIORITY, SETTINGS) == []


def test_load_imbalance_moves_the_cheapest_request_to_the_freest_instance() -> None:
    crowded = view("a", [req("big", 40), req("small", 10), req("mid", 30)])  # (100-80)/3 = 6.7
    empty = view("b")
    (plan,) = plan_migrations([crowded, empty], PRIORITY, SETTINGS)
    assert (plan.request_id, plan.source, plan.destination) == ("small", "a", "b")


def test_a_request_that_left_is_not_moved_again_before_the_source_reports() -> None:
    """After one move the source's latest snapshot still shows the request that left (the
    engine frees its blocks at its next step). The view without it plans nothing more; the
    stale one would move a second request (what the e2e test once saw on a loaded machine)."""
    crowded = InstanceSnapshot(63, 32, BLOCK, running=tuple(req(f"r{i}", 8) for i in range(4)))
    (first,) = plan_migrations([InstanceView("0", crowded), view("1", total=63)], PRIORITY, SETTINGS)
    arrived = view("1", total=63).snapshot.with_pending((req(first.request_id, 0, demand=8),))
    assert plan_migrations([InstanceView("0", crowded), InstanceView("1", arrived)], PRIORITY, SETTINGS) != []
    left = crowded.without(frozenset({first.request_id}))
    assert (left.used_blocks, len(left.running)) == (24, 3) and first.request_id not in left.request_ids
    assert plan_migrations([InstanceView("0", left), InstanceView("1", arrived)], PRIORITY, SETTINGS) == []
    assert crowded.without(frozenset({"elsewhere"})) is crowded


def test_defragmentation_makes_room_for_a_queued_request() -> None:
    """60 of 100 blocks are used, but the queued request needs 50: without counting its demand
    the instance looks fine ((100-60)/3 = 13.3); with it, it is overloaded."""
    stuck = view("a", [req("r1", 30), req("r2", 30)], waiting=[req("big-prompt", 0, demand=50)])
    other = view("b", [req("b1", 10)])
    assert migration_freeness(stuck, PRIORITY) < 0
    (plan,) = plan_migrations([stuck, other], PRIORITY, SETTINGS)
    assert plan.source == "a" and plan.destination == "b"


def test_high_priority_headroom_moves_low_priority_work_away() -> None:
    """The instance serving an urgent request keeps headroom for it, so its least urgent request
    leaves, never the urgent one."""
    mixed = view("a", [req("urgent", 20, priority=-5), req("background", 20, priority=5)])
    plain = view("b", [req("b1", 10)])
    settings = MigrationSettings(source_below_tokens=25 * BLOCK, destination_above_tokens=25 * BLOCK)
    assert migration_freeness(mixed, PRIORITY) < migration_freeness(plain, PRIORITY)
    (plan,) = plan_migrations([mixed, plain], PRIORITY, settings)
    assert (plan.request_id, plan.source) == ("background", "a")


def test_a_draining_instance_is_emptied_whatever_its_load() -> None:
    draining = view("a", [req("r1", 5)], accepting=False, draining=True)
    idle = view("b")
    (plan,) = plan_migrations([draining, idle], PRIORITY, SETTINGS)
    assert (plan.request_id, plan.source, plan.destination) == ("r1", "a", "b")
    # Nothing goes to a draining instance, however free it is.
    assert plan_migrations([view("c", [req(f"c{i}", 19) for i in range(5)]), draining], PRIORITY, SETTINGS) == []


def test_no_room_no_move() -> None:
    crowded = view("a", [req("huge", 90)])
    small = view("b", total=60)  # freer, but cannot hold 90 blocks
    assert plan_migrations([crowded, small], PRIORITY, MigrationSettings(source_below_tokens=5 * BLOCK, destination_above_tokens=20 * BLOCK)) == []


def test_a_request_still_in_prefill_is_never_picked() -> None:
    crowded = view("a", [req("prefilling", 10, priority=9, decoding=False), req("r1", 40), req("r2", 40)])
    (plan,) = plan_migrations([crowded, view("b")], PRIORITY, SETTINGS)
    assert plan.request_id == "r1"  # "prefilling" is less urgent and smaller, but cannot move yet
    only_prefilling = view("a", [req("p1", 45, decoding=False), req("p2", 45, decoding=False)])
    assert plan_migrations([only_prefilling, view("b")], PRIORITY, SETTINGS) == []


def test_busy_instances_and_migrating_requests_are_left_alone() -> None:
    crowded = view("a", [req("r1", 45), req("r2", 45)])  # (100 - 90) / 2 = 5
    empty = view("b")
    full = {"b": SETTINGS.max_in_flight_per_instance}
    assert plan_migrations([crowded, empty], PRIORITY, SETTINGS, in_flight=full) == []
    (plan,) = plan_migrations([crowded, empty], PRIORITY, SETTINGS, in_flight={"b": 1}, migrating=frozenset({"r1"}))
    assert plan.request_id == "r2"


requests = st.lists(st.tuples(st.integers(1, 30), st.integers(-3, 3), st.booleans()), max_size=6)


@st.composite
def cluster(draw):
    views = []
    for i in range(draw(st.integers(1, 5))):
        running = [req(f"i{i}r{j}", b, p, decoding=d) for j, (b, p, d) in enumerate(draw(requests))]
        views.append(view(f"i{i}", running, total=draw(st.integers(1, 200)) + sum(r.num_blocks for r in running),
                          accepting=draw(st.booleans()), draining=draw(st.booleans())))
    return views


@given(cluster(), st.integers(1, 3))
def test_every_plan_is_safe(views, limit) -> None:
    """Whatever the cluster: no instance takes part in more migrations than allowed, no request
    moves twice, requests come from their own source and are decoding, destinations accept
    work, are not in trouble, and have room for everything sent to them, and every move goes
    to an instance freer than its source."""
    settings = SETTINGS.model_copy(update={"max_in_flight_per_instance": limit})
    plans = plan_migrations(views, PRIORITY, settings)
    by_id = {v.instance_id: v for v in views}
    involved = Counter([p.source for p in plans] + [p.destination for p in plans])
    assert all(n <= limit for n in involved.values())
    assert len({p.request_id for p in plans}) == len(plans)
    received: Counter[str] = Counter()
    for plan in plans:
        source, destination = by_id[plan.source], by_id[plan.destination]
        moved = next(r for r in source.snapshot.running if r.request_id == plan.request_id)
        assert moved.decoding
        assert destination.accepting and not destination.draining and not in_trouble(destination)
        received[plan.destination] += moved.num_blocks + 1
        assert received[plan.destination] <= destination.snapshot.free_blocks
        assert migration_freeness(destination, PRIORITY) > migration_freeness(source, PRIORITY)


@given(cluster())
def test_plans_are_the_same_whatever_the_block_size(views) -> None:
    """Thresholds are in tokens: the same load in tokens gives the same plan with 16-token and
    128-token blocks."""
    def rescaled(v: InstanceView, factor: int) -> InstanceView:
        snap = dataclasses.replace(v.snapshot, block_size=v.snapshot.block_size * factor)
        return dataclasses.replace(v, snapshot=snap)

    settings = SETTINGS.model_copy(update={"max_in_flight_per_instance": 2})
    # Scaling block size by 8 and thresholds by 8 is the same cluster seen with coarser blocks.
    coarse = MigrationSettings(source_below_tokens=settings.source_below_tokens * 8,
                               destination_above_tokens=settings.destination_above_tokens * 8,
                               max_in_flight_per_instance=2)
    priority = PrioritySettings(high_below=0, headroom_tokens=32 * BLOCK * 8)
    assert plan_migrations(views, PRIORITY, settings) == plan_migrations(
        [rescaled(v, 8) for v in views], priority, coarse)


# --- instances in trouble: a preempted request waits, or the queue's head cannot be admitted -----

def test_an_instance_that_preempted_is_a_source_even_when_it_looks_free() -> None:
    """Preemption frees the victim's blocks, so the instance may look free; it is still the one
    whose requests do not fit, so it sends work away, and never receives any."""
    victim = req("victim", 0, demand=10)
    preempting = view("a", [req("a1", 20), req("a2", 20)], waiting=[dataclasses.replace(victim, preempted=True)])
    idle = view("b")
    assert migration_freeness(preempting, PRIORITY) > SETTINGS.source_below_tokens  # free by the numbers
    (plan,) = plan_migrations([preempting, idle], PRIORITY, SETTINGS)
    assert (plan.source, plan.destination) == ("a", "b")
    # Never a destination, however free it is.
    crowded = view("c", [req("c1", 45), req("c2", 45)])
    spacious_but_preempting = view("d", total=1000, waiting=[dataclasses.replace(victim, preempted=True)])
    assert plan_migrations([crowded, spacious_but_preempting], PRIORITY, SETTINGS) == []


def test_a_blocked_head_of_line_makes_a_source_until_it_fits() -> None:
    stuck = view("a", [req(f"r{i}", 10) for i in range(6)], waiting=[req("long-prompt", 0, demand=50)])
    plans = plan_migrations([stuck, view("b", total=200), view("c", total=200)], PRIORITY,
                            SETTINGS.model_copy(update={"max_in_flight_per_instance": 4}))
    assert {p.source for p in plans} == {"a"} and len(plans) >= 2
    assert {p.destination for p in plans} == {"b", "c"}
    # Afterwards the queued request fits: 100 - 60 used + what left >= 50.
    assert 100 - 60 + 10 * len(plans) >= 50


def test_a_blocked_instance_is_rescued_by_a_busy_model() -> None:
    """When every instance is busy, none is above `destination_above_tokens`, yet moving one
    request off the instance whose queue head does not fit is what admits it: a rescue may go
    to an instance that stays a quarter of the way between the thresholds (15 blocks per request
    here)."""
    bar = 15 * BLOCK
    busy = view("b", [req(f"b{i}", 5) for i in range(14)], total=310)  # (310 - 70) / 14 = 17.1 blocks each
    assert bar < migration_freeness(busy, PRIORITY) < SETTINGS.destination_above_tokens
    stuck = view("a", [req("a1", 30), req("a2", 6)], waiting=[req("long-prompt", 0, demand=70)])  # 64 free
    (plan,) = plan_migrations([stuck, busy], PRIORITY, SETTINGS)
    assert (plan.request_id, plan.source, plan.destination) == ("a2", "a", "b")
    # The same busy instance takes nothing from one merely low on room (not in trouble)...
    low = view("c", [req(f"c{i}", 18) for i in range(5)])  # (100 - 90) / 5 = 2 blocks each
    assert plan_migrations([low, busy], PRIORITY, SETTINGS) == []
    # ...nor a rescue that would leave it below the bar: (310 - 70 - 53) / 15 = 12.5 blocks each.
    stuck_big = view("d", [req("d1", 52)], waiting=[req("long-prompt", 0, demand=70)])
    assert plan_migrations([stuck_big, busy], PRIORITY, SETTINGS) == []
    # An instance free enough to be an ordinary destination (44 blocks) may still be left below
    # the bar, as by any move, if not below the source threshold: (60 - 16 - 17) / 2 = 13.5.
    roomy = view("e", [req("e1", 16)], total=60)
    stuck_too = view("f", [req("f1", 16)], waiting=[req("long-prompt", 0, demand=48)], total=60)  # 44 free
    (plan,) = plan_migrations([stuck_too, roomy], PRIORITY, SETTINGS)
    assert (plan.request_id, plan.source, plan.destination) == ("f1", "f", "e")


def test_several_migrations_in_flight_but_never_overshooting() -> None:
    """An overloaded instance sends as many requests as bring it towards the others, and stops
    before the destination would be the overloaded one."""
    crowded = view("a", [req(f"r{i}", 10) for i in range(9)], total=100)
    empty = view("b", total=100)
    plans = plan_migrations([crowded, empty], PRIORITY, SETTINGS.model_copy(update={"max_in_flight_per_instance": 8}))
    assert 2 <= len(plans) <= 5
    assert all((p.source, p.destination) == ("a", "b") for p in plans)
