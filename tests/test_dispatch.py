"""Dispatch policies, on snapshots alone: no processes, no engines."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from llumnix_backend.config import DispatchPolicyName, PrioritySettings
from llumnix_backend.policies.dispatch import NoInstanceAvailable, choose_instance, freeness, virtual_usage
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, LoadTotals, RequestLoad

PRIORITY = PrioritySettings(high_below=0, headroom_tokens=64)
BLOCK = 16


def request(i: int, blocks: int, priority: int = 0, demand: int = 0) -> RequestLoad:
    return RequestLoad(f"r{i}", priority, blocks * BLOCK, blocks, demand)


def view(instance_id: str, total: int, running=(), waiting=(), used: int | None = None, **kw) -> InstanceView:
    used = sum(r.num_blocks for r in running) if used is None else used
    snap = InstanceSnapshot(total, used, BLOCK, running=tuple(running), waiting=tuple(waiting))
    return InstanceView(instance_id, snap, **kw)


requests_st = st.lists(st.tuples(st.integers(0, 40), st.integers(-3, 3)), max_size=8)


@st.composite
def instance_views(draw, min_size=1, max_size=6):
    n = draw(st.integers(min_size, max_size))
    views = []
    for i in range(n):
        total = draw(st.integers(1, 400))
        running = [request(j, b, p) for j, (b, p) in enumerate(draw(requests_st))]
        waiting = [request(100 + j, 0, p, demand=b) for j, (b, p) in enumerate(draw(requests_st))]
        views.append(view(
            f"i{i}", total, running, waiting,
            accepting=draw(st.booleans()), draining=draw(st.booleans()),
        ))
    return views


def eligible(views):
    return [v for v in views if v.accepting and not v.draining]


# --- llumnix -----------------------------------------------------------------------------------

def test_freeness_counts_usage_queued_demand_and_batch() -> None:
    v = view("a", total=100, running=[request(0, 10), request(1, 20)], waiting=[request(2, 0, demand=10)])
    # (100 - 30 used - 10 demand) blocks of 16 tokens / 3 requests: decode steps left
    assert freeness(v, PrioritySettings(headroom_tokens=0)) == pytest.approx(20.0 * BLOCK)


def test_an_overloaded_instance_with_more_requests_is_less_free() -> None:
    """Both are over their blocks; the busier one (12 requests, 60 blocks short) must rank below
    the other (3 requests, 20 short). Dividing the deficit by the batch had it backwards."""
    busier = view("a", total=100, used=100, waiting=[request(i, 0, demand=5) for i in range(12)])
    lighter = view("b", total=100, used=100, waiting=[request(i, 0, demand=20 if i == 0 else 0) for i in range(3)])
    no_headroom = PrioritySettings(headroom_tokens=0)
    assert freeness(busier, no_headroom) < freeness(lighter, no_headroom) < 0
    assert choose_instance(DispatchPolicyName.LLUMNIX, [busier, lighter], no_headroom) == "b"


@given(deficit=st.integers(1, 500), batch=st.integers(1, 200), more_deficit=st.integers(0, 100),
       more_requests=st.integers(0, 100))
def test_overload_ranks_by_deficit_and_batch(deficit, batch, more_deficit, more_requests) -> None:
    """Among overloaded instances, a larger deficit or a larger batch is never freer."""
    def overloaded(d: int, n: int) -> InstanceView:
        return view("x", total=100, used=100, waiting=[request(i, 0, demand=d if i == 0 else 0) for i in range(n)])

    no_headroom = PrioritySettings(headroom_tokens=0)
    base = freeness(overloaded(deficit, batch), no_headroom)
    assert freeness(overloaded(deficit + more_deficit, batch + more_requests), no_headroom) <= base < 0
    assert base < freeness(view("y", total=100, used=100), no_headroom) == 0


@given(instance_views())
def test_freeness_means_the_same_whatever_the_block_size(views) -> None:
    """The same load in tokens with 8x coarser blocks gives the same freeness."""
    for v in views:
        coarse = dataclasses.replace(v, snapshot=dataclasses.replace(v.snapshot, block_size=BLOCK * 8))
        coarse_priority = PRIORITY.model_copy(update={"headroom_tokens": PRIORITY.headroom_tokens * 8})
        # 8x the tokens per block, the same blocks: 8x the freeness, the same ordering.
        assert freeness(coarse, coarse_priority) == pytest.approx(8 * freeness(v, PRIORITY))


@given(instance_views(), instance_views())
def test_totals_match_the_requests(views, extra) -> None:
    """The per-snapshot totals the policies read (and their sum with pending requests) are what
    walking the requests gives."""
    for v, e in zip(views, extra):
        pending = e.snapshot.running + e.snapshot.waiting
        snap = v.snapshot.with_pending(pending)
        everyone = snap.running + snap.waiting
        assert snap.totals == LoadTotals.of(everyone)
        assert snap.totals.num_requests == len(everyone)
        assert snap.totals.queued_demand == sum(r.demand_blocks for r in everyone)
        assert snap.totals.count_below(0) == sum(r.priority < 0 for r in everyone)


def test_high_priority_requests_carry_headroom() -> None:
    plain = view("a", total=100, running=[request(0, 10, priority=0)])
    urgent = view("b", total=100, running=[request(0, 10, priority=-1)])
    assert virtual_usage(urgent, PRIORITY) - virtual_usage(plain, PRIORITY) == 64 // BLOCK


def test_draining_instance_has_infinite_usage() -> None:
    assert virtual_usage(view("a", 100, draining=True), PRIORITY) == float("inf")


def test_llumnix_prefers_the_instance_with_room() -> None:
    busy = view("a", total=100, running=[request(i, 20) for i in range(4)])
    idle = view("b", total=100)
    assert choose_instance(DispatchPolicyName.LLUMNIX, [busy, idle], PRIORITY) == "b"


def test_llumnix_avoids_instances_holding_high_priority_work() -> None:
    # Same physical load; the instance running an urgent request keeps headroom for it.
    urgent = view("a", total=100, running=[request(0, 10, priority=-5)])
    plain = view("b", total=100, running=[request(0, 10, priority=0)])
    assert choose_instance(DispatchPolicyName.LLUMNIX, [urgent, plain], PRIORITY) == "b"


@given(instance_views())
def test_llumnix_never_picks_a_less_free_instance(views) -> None:
    assume(eligible(views))
    chosen = choose_instance(DispatchPolicyName.LLUMNIX, views, PRIORITY)
    best = max(freeness(v, PRIORITY) for v in eligible(views))
    chosen_view = next(v for v in views if v.instance_id == chosen)
    assert freeness(chosen_view, PRIORITY) == best


# --- every policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", list(DispatchPolicyName))
@given(views=instance_views())
def test_policies_pick_only_eligible_instances(policy, views) -> None:
    if not eligible(views):
        with pytest.raises(NoInstanceAvailable):
            choose_instance(policy, views, PRIORITY)
        return
    chosen = choose_instance(policy, views, PRIORITY)
    assert chosen in {v.instance_id for v in eligible(views)}


@given(instance_views(min_size=1))
def test_queue_picks_the_shortest_queue(views) -> None:
    assume(eligible(views))
    chosen = choose_instance(DispatchPolicyName.QUEUE, views, PRIORITY)
    length = {v.instance_id: len(v.snapshot.running) + len(v.snapshot.waiting) for v in views}
    assert length[chosen] == min(length[v.instance_id] for v in eligible(views))


@given(instance_views(min_size=1))
def test_kv_usage_picks_the_least_used(views) -> None:
    assume(eligible(views))

    def usage(v):
        s = v.snapshot
        return (s.used_blocks + sum(r.demand_blocks for r in s.waiting)) / s.total_blocks

    chosen = choose_instance(DispatchPolicyName.KV_USAGE, views, PRIORITY)
    by_id = {v.instance_id: v for v in views}
    assert usage(by_id[chosen]) == min(usage(v) for v in eligible(views))


# --- round robin -------------------------------------------------------------------------------

@given(
    n_instances=st.integers(1, 6),
    rounds=st.integers(1, 5),
    start=st.none() | st.sampled_from(["i0", "i3", "zz", ""]),
    order=st.randoms(),
)
def test_round_robin_is_fair(n_instances, rounds, start, order) -> None:
    """Over any k * N consecutive decisions, each of N eligible instances gets exactly k,
    whatever order the views come in and wherever the rotation starts."""
    views = [view(f"i{i}", 10) for i in range(n_instances)]
    last = start
    picks = Counter()
    for _ in range(rounds * n_instances):
        order.shuffle(views)
        last = choose_instance(DispatchPolicyName.ROUND_ROBIN, views, PRIORITY, last)
        picks[last] += 1
    assert picks == {f"i{i}": rounds for i in range(n_instances)}


@given(st.lists(st.integers(0, 4), min_size=1, max_size=30))
def test_round_robin_skips_ineligible_instances_without_starving_others(down_sequence) -> None:
    """Whichever instance is down at each step, the others keep rotating: no instance that is
    up gets two picks while another instance that stayed up got none."""
    ids = [f"i{i}" for i in range(5)]
    last = None
    picks = []
    for down in down_sequence:
        views = [view(i, 10, accepting=(i != ids[down])) for i in ids]
        last = choose_instance(DispatchPolicyName.ROUND_ROBIN, views, PRIORITY, last)
        assert last != ids[down]
        picks.append(last)
    # Consecutive picks never repeat while at least two instances are up.
    assert all(a != b for a, b in zip(picks, picks[1:]))


def test_pending_requests_count_before_the_engine_reports_them() -> None:
    snap = InstanceSnapshot(100, 0, BLOCK)
    loaded = snap.with_pending((request(0, 0, demand=50),))
    a = InstanceView("a", loaded)
    b = InstanceView("b", snap)
    assert choose_instance(DispatchPolicyName.LLUMNIX, [a, b], PRIORITY) == "b"
    assert choose_instance(DispatchPolicyName.QUEUE, [a, b], PRIORITY) == "b"
    assert choose_instance(DispatchPolicyName.KV_USAGE, [a, b], PRIORITY) == "b"
