"""Continuous rescheduling: which running requests to migrate, and where (Llumnix, OSDI '24).

A pure function of instance views, called every interval. It returns every migration worth
starting now, planned one at a time against a projection of the load each earlier choice leaves
behind, so several can be in flight at once without overshooting.

- Sources: instances whose migration freeness is below `source_below_tokens`, that are
  draining, or that are in trouble now: they hold a preempted request waiting for
  recomputation, or cannot admit their next queued request. An instance in trouble stays a
  source until it is comfortably free (above `destination_above_tokens`) and is never a
  destination.
- Destinations: accepting instances above `destination_above_tokens`. An instance in trouble
  may also send to one that stays at least a quarter of the way from `source_below_tokens` to
  `destination_above_tokens` (a rescue; 240 tokens by default): when the whole model is busy, no
  instance is above `destination_above_tokens`, yet moving one request off an instance whose
  queue head does not fit is what admits it (Llumnix's de-fragmentation). The quarter is the
  simulator's choice (docs/scheduling.md): halfway rescued less, and `source_below_tokens`
  itself made the destinations preempt 1.4-1.6 times as often past the knee.
- The least free source sends to the freest destination: its least urgent request (highest
  priority value), then the one holding the fewest blocks (cheapest to move, and the shortest
  running: Llumnix's default). A move is made only if the destination has room for it and
  stays clear of being a source itself, and the gap between the two shrinks (Llumnix's balanced
  pairing).
- Each instance takes part in at most `max_in_flight_per_instance` migrations, counting those
  already in flight.

Migration freeness differs from dispatch freeness in what it counts of the queue: only the
head-of-line request's demand, so an instance whose next request cannot be admitted looks
overloaded until migration makes room for it (de-fragmentation). High-priority requests carry
their headroom (so low-priority work leaves their instance), and a draining instance counts
as infinitely loaded (so everything leaves it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from llumnix_backend.config import MigrationSettings, PrioritySettings
from llumnix_backend.policies.dispatch import freeness_from, headroom_blocks
from llumnix_backend.snapshot import InstanceView, RequestLoad


@dataclass(frozen=True)
class PlannedMigration:
    request_id: str
    source: str
    destination: str


def migration_freeness(view: InstanceView, priority: PrioritySettings) -> float:
    return _Projection.of(view, priority).freeness


def in_trouble(view: InstanceView) -> bool:
    """The instance preempted a request that still waits, or cannot admit its next one."""
    snap = view.snapshot
    return snap.totals.num_preempted > 0 or snap.head_of_line_blocked


def pick_request(running: Iterable[RequestLoad], exclude: frozenset[str] = frozenset()) -> RequestLoad | None:
    """The request a source sends: least urgent first, then the fewest blocks. Only decoding
    requests move; one still in (chunked) prefill is never picked."""
    candidates = [r for r in running if r.decoding and r.request_id not in exclude]
    return max(candidates, key=lambda r: (r.priority, -r.num_blocks), default=None)


@dataclass
class _Projection:
    """An instance's load as the migrations planned so far will leave it."""

    view: InstanceView
    fixed_blocks: float  # head-of-line demand and priority headroom (infinite when draining)
    used_blocks: int
    num_requests: int
    trouble: bool
    slots: int = 0  # migrations it may still take part in
    leaving: set[str] = field(default_factory=set)

    @staticmethod
    def of(view: InstanceView, priority: PrioritySettings, slots: int = 0) -> _Projection:
        snap = view.snapshot
        fixed = math.inf if view.draining else snap.head_of_line_demand + headroom_blocks(snap, priority)
        return _Projection(view, fixed, snap.used_blocks, snap.totals.num_requests, in_trouble(view), slots)

    @property
    def id(self) -> str:
        return self.view.instance_id

    def freeness_with(self, blocks: int, requests: int) -> float:
        snap = self.view.snapshot
        free = snap.total_blocks - (self.used_blocks + blocks) - self.fixed_blocks
        return freeness_from(free, snap.block_size, self.num_requests + requests)

    @property
    def freeness(self) -> float:
        return self.freeness_with(0, 0)

    def room(self) -> float:
        return self.view.snapshot.total_blocks - self.used_blocks - self.fixed_blocks

    def is_source(self, settings: MigrationSettings) -> bool:
        threshold = settings.destination_above_tokens if self.trouble else settings.source_below_tokens
        return self.view.draining or self.freeness < threshold

    def is_destination_for(self, source: _Projection, settings: MigrationSettings) -> bool:
        view = self.view
        return (view.accepting and not view.draining and not self.trouble
                and self.freeness > (_rescue_bar(settings) if source.trouble else settings.destination_above_tokens))

    def move(self, request: RequestLoad, sign: int) -> None:
        self.used_blocks += sign * request.num_blocks
        self.num_requests += sign
        self.slots -= 1


def plan_migrations(
    views: Sequence[InstanceView],
    priority: PrioritySettings,
    settings: MigrationSettings,
    in_flight: Mapping[str, int] | None = None,
    migrating: frozenset[str] = frozenset(),
) -> list[PlannedMigration]:
    """Migrations to start now. `in_flight` counts the migrations each instance already takes
    part in; `migrating` requests are never picked: they are already on their way, or cannot
    move (`GenerationRequest.bound_to_its_engine`)."""
    in_flight = in_flight or {}
    limit = settings.max_in_flight_per_instance
    load = [_Projection.of(v, priority, limit - in_flight.get(v.instance_id, 0)) for v in views]
    plans: list[PlannedMigration] = []
    taken = set(migrating)
    dead_ends: set[str] = set()  # sources with nothing that can go anywhere
    while True:
        sources = [p for p in load if p.slots > 0 and p.id not in dead_ends and p.view.snapshot.running
                   and p.is_source(settings)]
        if not sources:
            return plans
        source = min(sources, key=lambda p: p.freeness)
        destinations = [p for p in load if p.slots > 0 and p.is_destination_for(source, settings)]
        request = pick_request(source.view.snapshot.running, frozenset(taken))
        destination = None if request is None else next(
            (d for d in sorted(destinations, key=lambda p: -p.freeness) if _worth_it(source, d, request, settings)),
            None)
        if request is None or destination is None:
            dead_ends.add(source.id)
            continue
        plans.append(PlannedMigration(request.request_id, source.id, destination.id))
        taken.add(request.request_id)
        source.move(request, -1)
        destination.move(request, +1)


_RESCUE_BAR = 0.25  # see the module's notes on a rescue


def _rescue_bar(settings: MigrationSettings) -> float:
    low, high = settings.source_below_tokens, settings.destination_above_tokens
    return low + _RESCUE_BAR * (high - low)


def _may_receive(source: _Projection, destination: _Projection, after: float, settings: MigrationSettings) -> bool:
    """Whether `destination` may take a request from `source`, left `after` free by it: a move
    needs a destination above `destination_above_tokens` that it does not make a source
    (ping-pong); a source in trouble may also be rescued by one that stays above the rescue bar."""
    if destination.freeness > settings.destination_above_tokens and after >= settings.source_below_tokens:
        return True
    return source.trouble and after >= _rescue_bar(settings)


def _worth_it(source: _Projection, destination: _Projection, request: RequestLoad,
              settings: MigrationSettings) -> bool:
    if destination.id == source.id or request.num_blocks + 1 > destination.room():
        return False
    after = destination.freeness_with(request.num_blocks + 1, 1)
    if not _may_receive(source, destination, after, settings):
        return False
    if source.view.draining:  # always worth emptying
        return True
    # Llumnix's balanced pairing: the gap between the pair's freeness must shrink.
    gap_after = abs(source.freeness_with(-request.num_blocks, -1) - after)
    return gap_after < abs(source.freeness - destination.freeness)
