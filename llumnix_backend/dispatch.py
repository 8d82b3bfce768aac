"""Dispatch policies: which instance of a model gets a new request.

Pure functions over immutable instance views (see `snapshot.py`). Every policy considers only
instances that accept work, and breaks ties by the order the views are given in, so a decision
is a function of its inputs alone.

- `round_robin`: the next accepting instance after the last one chosen, in id order.
- `queue`: fewest requests (running + waiting).
- `kv_usage`: lowest fraction of KV blocks in use, counting what queued requests will need.
- `llumnix`: highest freeness, Llumnix's (OSDI '24) measure of how many more decode steps an
  instance can sustain: (total blocks - virtual usage) / batch size, where virtual usage is the
  physical usage, plus what queued requests need, plus KV headroom kept for each high-priority
  request; a draining instance has infinite virtual usage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from llumnix_backend.config import DispatchPolicyName, PrioritySettings
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, blocks_for


class NoInstanceAvailable(Exception):
    """No instance of the model accepts requests right now."""


def headroom_blocks(snapshot: InstanceSnapshot, priority: PrioritySettings) -> int:
    """KV blocks set aside for the high-priority requests an instance holds or will hold."""
    if priority.headroom_tokens == 0:
        return 0
    per_request = blocks_for(priority.headroom_tokens, snapshot.block_size)
    high = sum(1 for r in snapshot.running + snapshot.waiting if r.priority < priority.high_below)
    return high * per_request


def virtual_usage(view: InstanceView, priority: PrioritySettings) -> float:
    if view.draining:
        return math.inf
    snap = view.snapshot
    queued_demand = sum(r.demand_blocks for r in snap.waiting)
    return snap.used_blocks + queued_demand + headroom_blocks(snap, priority)


def freeness(view: InstanceView, priority: PrioritySettings) -> float:
    """Llumnix freeness: free virtual blocks per request in the batch (higher is freer)."""
    snap = view.snapshot
    batch = max(1, len(snap.running) + len(snap.waiting))
    return (snap.total_blocks - virtual_usage(view, priority)) / batch


def _queue_length(view: InstanceView) -> int:
    return len(view.snapshot.running) + len(view.snapshot.waiting)


def _kv_usage(view: InstanceView) -> float:
    snap = view.snapshot
    demand = sum(r.demand_blocks for r in snap.waiting)
    return (snap.used_blocks + demand) / max(1, snap.total_blocks)


def _round_robin(candidates: Sequence[InstanceView], last_choice: str | None) -> InstanceView:
    ordered = sorted(candidates, key=lambda v: v.instance_id)
    if last_choice is not None:
        for view in ordered:
            if view.instance_id > last_choice:
                return view
    return ordered[0]


def choose_instance(
    policy: DispatchPolicyName,
    views: Sequence[InstanceView],
    priority: PrioritySettings,
    last_choice: str | None = None,
) -> str:
    """The id of the instance that should take the next request.

    `last_choice` is the id this model's dispatcher chose last time (round robin's only state).
    Raises `NoInstanceAvailable` when no view accepts work.
    """
    candidates = [v for v in views if v.accepting and not v.draining]
    if not candidates:
        raise NoInstanceAvailable()
    if policy is DispatchPolicyName.ROUND_ROBIN:
        return _round_robin(candidates, last_choice).instance_id
    if policy is DispatchPolicyName.QUEUE:
        return min(candidates, key=_queue_length).instance_id
    if policy is DispatchPolicyName.KV_USAGE:
        return min(candidates, key=_kv_usage).instance_id
    if policy is DispatchPolicyName.LLUMNIX:
        return max(candidates, key=lambda v: freeness(v, priority)).instance_id
    raise ValueError(f"unknown dispatch policy {policy!r}")
