"""Dispatch policies: which instance of a model gets a new request.

Pure functions over immutable instance views (see `snapshot.py`). Every policy considers only
instances that accept work, and breaks ties by the order the views are given in, so a decision
is a function of its inputs alone.

- `round_robin`: the next accepting instance after the last one chosen, in id order.
- `queue`: fewest requests (running + waiting).
- `kv_usage`: lowest fraction of KV blocks in use, counting what queued requests will need.
- `llumnix`: highest freeness, Llumnix's (OSDI '24) measure of how many more decode steps an
  instance can sustain: free virtual KV room in tokens per request in the batch, where virtual
  usage is the physical usage, plus what queued requests need, plus any KV headroom kept for each
  high-priority request; a draining instance has infinite virtual usage.

Freeness is counted in tokens (a decode step adds one token per request), so it means the same
whatever the engine's block size (16 tokens on GPUs, 128 on CPUs). An overloaded instance (more
virtual usage than blocks) has negative freeness: its deficit times its batch, so that a bigger
deficit and a bigger batch both rank it lower (dividing would make the busier one look freer).

Every figure a policy reads comes from the snapshot's `totals`, summed once per snapshot, so a
decision costs O(instances).
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
    return snapshot.totals.count_below(priority.high_below) * per_request


def virtual_usage(view: InstanceView, priority: PrioritySettings) -> float:
    if view.draining:
        return math.inf
    snap = view.snapshot
    return snap.used_blocks + snap.totals.queued_demand + headroom_blocks(snap, priority)


def freeness_from(free_blocks: float, block_size: int, batch: int) -> float:
    """Free virtual room in tokens per request (decode steps left); see the module's notes on
    an overloaded instance."""
    tokens = free_blocks * block_size
    batch = max(1, batch)
    return tokens / batch if tokens >= 0 else tokens * batch


def freeness(view: InstanceView, priority: PrioritySettings) -> float:
    """Llumnix freeness: free virtual KV room in tokens per request in the batch (higher is
    freer). Computed once per snapshot and settings."""
    if view.draining:
        return -math.inf
    return view.snapshot.derived(_freeness_key(priority), _snapshot_freeness, priority)


def _freeness_key(priority: PrioritySettings) -> tuple:
    return ("freeness", priority.high_below, priority.headroom_tokens)


def _snapshot_freeness(snap: InstanceSnapshot, priority: PrioritySettings) -> float:
    usage = snap.used_blocks + snap.totals.queued_demand + headroom_blocks(snap, priority)
    return freeness_from(snap.total_blocks - usage, snap.block_size, snap.totals.num_requests)


def _queue_length(view: InstanceView) -> int:
    return view.snapshot.totals.num_requests


def _kv_usage(view: InstanceView) -> float:
    snap = view.snapshot
    return (snap.used_blocks + snap.totals.queued_demand) / max(1, snap.total_blocks)


def _freest(views: Sequence[InstanceView], priority: PrioritySettings) -> InstanceView:
    """The first of the freest instances that take work. One pass, without a candidate list or
    a key function: this decision is on every request's path."""
    key = _freeness_key(priority)
    best, best_score = None, -math.inf
    for view in views:
        if view.accepting and not view.draining:  # (so `freeness` without its draining check)
            score = view.snapshot.derived(key, _snapshot_freeness, priority)
            if best is None or score > best_score:
                best, best_score = view, score
    if best is None:
        raise NoInstanceAvailable()
    return best


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
    if policy is DispatchPolicyName.LLUMNIX:
        return _freest(views, priority).instance_id
    candidates = [v for v in views if v.accepting and not v.draining]
    if not candidates:
        raise NoInstanceAvailable()
    if policy is DispatchPolicyName.ROUND_ROBIN:
        return _round_robin(candidates, last_choice).instance_id
    if policy is DispatchPolicyName.QUEUE:
        return min(candidates, key=_queue_length).instance_id
    if policy is DispatchPolicyName.KV_USAGE:
        return min(candidates, key=_kv_usage).instance_id
    raise ValueError(f"unknown dispatch policy {policy!r}")
