"""The rescheduling policy on snapshots: each trigger moves what it should and nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.config import MigrationSettings, PrioritySettings
from llumnix_backend.rescheduling import migration_freeness, pick_request, plan_migrations
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, RequestLoad

BLOCK = 16
PRIORITY = PrioritySettings(high_below=0, headroom_tokens=32 * BLOCK)
SETTINGS = MigrationSettings(source_below=10, destination_above=30)


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


def test_defragmentation_makes_room_for_a_queued_request() -> None:
    """60 of 100 blocks are used, but the queued request needs 50: without counting its demand
    the instance looks fine ((100-60)/3 = 13.3); with it, it is overloaded."""
    stuck = view("a", [req("r1", 30), req("r2", 30)], waiting=[req("big-prompt", 0, demand=50)])
    other = view("b", [req("b1", 10)])
    assert migration_freeness(stuck, PRIORITY) < 0
    (plan,) = plan_migrations([stuck, other], PRIORITY, SETTINGS)
    assert plan.source == "a" and plan.destination == "b"


def test_high_priority_headroom_moves_low_priority_work_away() -> None:
    """Same physical load on both; the instance serving an urgent request keeps headroom for it,
    so its least urgent request leaves, never the urgent one."""
    mixed = view("a", [req("urgent", 20, priority=-5), req("background", 20, priority=5)])
    plain = view("b", [req("b1", 20), req("b2", 20)])
    settings = MigrationSettings(source_below=25, destination_above=25)
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
    assert plan_migrations([crowded, small], PRIORITY, MigrationSettings(source_below=20, destination_above=5)) == []


def test_a_request_still_in_prefill_is_never_picked() -> None:
    crowded = view("a", [req("prefilling", 10, priority=9, decoding=False), req("r1", 40), req("r2", 40)])
    (plan,) = plan_migrations([crowded, view("b")], PRIORITY, SETTINGS)
    assert plan.request_id == "r1"  # "prefilling" is less urgent and smaller, but cannot move yet
    only_prefilling = view("a", [req("p1", 45, decoding=False), req("p2", 45, decoding=False)])
    assert plan_migrations([only_prefilling, view("b")], PRIORITY, SETTINGS) == []


def test_busy_instances_and_migrating_requests_are_left_alone() -> None:
    crowded = view("a", [req("r1", 45), req("r2", 45)])  # (100 - 90) / 2 = 5
    empty = view("b")
    assert plan_migrations([crowded, empty], PRIORITY, SETTINGS, busy=frozenset({"b"})) == []
    (plan,) = plan_migrations([crowded, empty], PRIORITY, SETTINGS, migrating=frozenset({"r1"}))
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


@given(cluster())
def test_every_plan_is_safe(views) -> None:
    """Whatever the cluster: each instance takes part in at most one migration, requests come
    from their own source, destinations accept work and have room, and moves go to freer
    instances."""
    plans = plan_migrations(views, PRIORITY, SETTINGS)
    by_id = {v.instance_id: v for v in views}
    involved = [p.source for p in plans] + [p.destination for p in plans]
    assert len(involved) == len(set(involved))
    for plan in plans:
        source, destination = by_id[plan.source], by_id[plan.destination]
        moved = next(r for r in source.snapshot.running if r.request_id == plan.request_id)
        assert destination.accepting and not destination.draining
        assert moved.num_blocks < destination.snapshot.free_blocks
        assert migration_freeness(destination, PRIORITY) > migration_freeness(source, PRIORITY)
        assert moved.decoding and moved == pick_request(source.snapshot.running)
