"""Continuous rescheduling: which running requests to migrate, and where (Llumnix, OSDI '24).

A pure function of instance views, called every interval. Sources are instances whose
migration freeness is below a threshold (or that are draining); destinations are accepting
instances above another threshold. The least free source is paired with the freest
destination, the next with the next, and each source sends one request: the least urgent
(highest priority value), then the one holding the fewest blocks (cheapest to move).

Migration freeness differs from dispatch freeness in what it counts of the queue: only the
head-of-line request's demand, so an instance whose next request cannot be admitted looks
overloaded until migration makes room for it (de-fragmentation). High-priority requests carry
their headroom (so low-priority work leaves their instance), and a draining instance counts
as infinitely loaded (so everything leaves it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llumnix_backend.config import MigrationSettings, PrioritySettings
from llumnix_backend.dispatch import headroom_blocks
from llumnix_backend.snapshot import InstanceView, RequestLoad


@dataclass(frozen=True)
class PlannedMigration:
    request_id: str
    source: str
    destination: str


def migration_freeness(view: InstanceView, priority: PrioritySettings) -> float:
    if view.draining:
        return -math.inf
    snap = view.snapshot
    usage = snap.used_blocks + snap.head_of_line_demand + headroom_blocks(snap, priority)
    return (snap.total_blocks - usage) / max(1, len(snap.running) + len(snap.waiting))


def pick_request(running: Iterable[RequestLoad], exclude: frozenset[str] = frozenset()) -> RequestLoad | None:
    """The request a source sends: least urgent first, then the fewest blocks. Only decoding
    requests move; one still in (chunked) prefill is never picked."""
    candidates = [r for r in running if r.decoding and r.request_id not in exclude]
    return max(candidates, key=lambda r: (r.priority, -r.num_blocks), default=None)


def plan_migrations(
    views: Sequence[InstanceView],
    priority: PrioritySettings,
    settings: MigrationSettings,
    busy: frozenset[str] = frozenset(),
    migrating: frozenset[str] = frozenset(),
) -> list[PlannedMigration]:
    """Migrations to start now. `busy` instances already have as many migrations in flight as
    allowed and take part in no other; `migrating` requests are already on their way."""
    free = {v.instance_id: migration_freeness(v, priority) for v in views}
    sources = sorted(
        (v for v in views if v.instance_id not in busy and v.snapshot.running
         and (v.draining or free[v.instance_id] < settings.source_below)),
        key=lambda v: free[v.instance_id],
    )
    destinations = sorted(
        (v for v in views if v.instance_id not in busy and v.accepting and not v.draining
         and free[v.instance_id] > settings.destination_above),
        key=lambda v: -free[v.instance_id],
    )
    plans = []
    used: set[str] = set()
    for source in sources:
        request = pick_request(source.snapshot.running, migrating)
        if request is None:
            continue
        for destination in destinations:
            if destination.instance_id in used or destination.instance_id == source.instance_id:
                continue
            room = destination.snapshot.free_blocks - destination.snapshot.head_of_line_demand
            # Moving must help: the destination stays freer than the source was.
            if request.num_blocks + 1 > room or free[destination.instance_id] <= free[source.instance_id]:
                continue
            plans.append(PlannedMigration(request.request_id, source.instance_id, destination.instance_id))
            used.update((source.instance_id, destination.instance_id))
            break
    return plans
