"""Load snapshots: what an engine instance reports about itself, every step.

Snapshots are immutable values. Backends build them inside the engine process and ship them to
the front end; policies (dispatch, and later migration and scaling) read nothing else.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RequestLoad:
    """One request as its instance sees it."""

    request_id: str
    priority: int
    num_tokens: int  # prompt + generated so far
    num_blocks: int  # KV blocks the request holds now
    demand_blocks: int = 0  # blocks it still needs before it can run (waiting requests)
    # Past its prefill and generating: only such a request can migrate (chunked prefill and
    # recomputation after preemption are not).
    decoding: bool = False
    # Waiting because the engine preempted it (its KV was freed; it will be recomputed).
    preempted: bool = False


@dataclass(frozen=True)
class LoadTotals:
    """What the policies need of an instance's requests, summed once per snapshot, so that a
    decision costs O(instances), not O(requests)."""

    num_requests: int = 0
    queued_demand: int = 0  # blocks the waiting requests still need
    num_preempted: int = 0  # waiting requests that were preempted
    priorities: tuple[tuple[int, int], ...] = ()  # (priority, number of requests), by priority

    @staticmethod
    def of(requests: Iterable[RequestLoad]) -> LoadTotals:
        requests = tuple(requests)
        return LoadTotals(
            num_requests=len(requests),
            queued_demand=sum(r.demand_blocks for r in requests),
            num_preempted=sum(r.preempted for r in requests),
            priorities=tuple(sorted(Counter(r.priority for r in requests).items())),
        )

    def plus(self, other: LoadTotals) -> LoadTotals:
        priorities = dict(self.priorities)
        for priority, n in other.priorities:
            priorities[priority] = priorities.get(priority, 0) + n
        return LoadTotals(
            self.num_requests + other.num_requests,
            self.queued_demand + other.queued_demand,
            self.num_preempted + other.num_preempted,
            tuple(sorted(priorities.items())),
        )

    def count_below(self, priority: int) -> int:
        """Requests more urgent than `priority` (a lower value is more urgent)."""
        return sum(n for p, n in self.priorities if p < priority)


# Bucket bounds of the tokens one engine step schedules (vLLM's `iteration_tokens` buckets).
STEP_TOKEN_BOUNDS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Bucket bounds of KV block residency times, in seconds (vLLM's `kv_cache_residency` buckets).
KV_RESIDENCY_BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600,
                       1200, 1800)


@dataclass(frozen=True)
class Tally:
    """What an engine observed since it started, as a histogram: one count per bucket bound
    and one past the last (not cumulative), and the observations' sum."""

    counts: tuple[int, ...] = ()
    total: float = 0


class BucketCounter:
    """Counts observations into a `Tally` over fixed bounds (the engine side; not shared)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total: float = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._total += value

    def tally(self) -> Tally:
        return Tally(tuple(self._counts), self._total)


@dataclass(frozen=True)
class SpecDecodeTally:
    """Speculative decoding since the instance started, as vLLM counts it: drafts, the draft
    tokens they proposed, those accepted, and accepted ones by draft position."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()

    def plus(self, drafts: int, draft_tokens: int, accepted_tokens: int,
             accepted_per_position: Iterable[int]) -> SpecDecodeTally:
        return SpecDecodeTally(self.drafts + drafts, self.draft_tokens + draft_tokens,
                               self.accepted_tokens + accepted_tokens,
                               tuple(a + b for a, b in zip(self.accepted_per_position, accepted_per_position)))


@dataclass(frozen=True)
class KvResidency:
    """vLLM's sampled KV block residency (engine argument `kv_cache_metrics`): per evicted
    block, its lifetime and its idle time before eviction, and the gaps between its uses."""

    lifetime: Tally
    idle_before_evict: Tally
    reuse_gap: Tally


@dataclass(frozen=True)
class InstanceSnapshot:
    """An instance's KV-cache and queue state at one moment.

    `used_blocks` counts blocks referenced by requests; evictable prefix-cache blocks count as
    free, as they are for the engine's own allocator.
    """

    total_blocks: int
    used_blocks: int
    block_size: int
    block_bytes: int = 0  # KV bytes of one block, all layers together
    running: tuple[RequestLoad, ...] = ()
    waiting: tuple[RequestLoad, ...] = ()  # in the order the engine will admit them
    num_preemptions: int = 0  # cumulative since the instance started
    # Waiting requests the engine put off for a transient reason (vLLM's "deferred": LoRA
    # budget, KV transfer, a blocked status); the rest wait for capacity.
    num_deferred: int = 0
    timestamp: float = 0.0  # time.monotonic() in the engine process (one clock per host)
    sequence: int = 0  # increases with every snapshot an instance sends
    engine_pid: int = 0  # the engine process that reported it (for operators; 0: unknown)
    # Since the instance started: engine steps by the tokens they scheduled (`STEP_TOKEN_BOUNDS`),
    step_tokens: Tally = Tally()
    # and KV block residency (`KV_RESIDENCY_BOUNDS`), where the engine samples it,
    kv_residency: KvResidency | None = None
    # and its speculative decoding, where it speculates.
    spec_decode: SpecDecodeTally | None = None

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    @property
    def head_of_line_demand(self) -> int:
        """Blocks the first waiting request needs before the engine can admit it."""
        return self.waiting[0].demand_blocks if self.waiting else 0

    @property
    def head_of_line_blocked(self) -> bool:
        """The first waiting request needs more blocks than are free: it cannot be admitted
        until something leaves (what migration can fix: de-fragmentation)."""
        return self.head_of_line_demand > self.free_blocks

    # Cached: a snapshot is immutable, and policies look at it once per decision.
    # (`cached_property` writes the instance's __dict__, which a frozen dataclass allows.)
    @cached_property
    def request_ids(self) -> frozenset[str]:
        return frozenset(r.request_id for r in self.running + self.waiting)

    @cached_property
    def totals(self) -> LoadTotals:
        return LoadTotals.of(self.running + self.waiting)

    def derived(self, key: Hashable, compute: Callable[..., T], *args: Any) -> T:
        """`compute(self, *args)`, computed once per `key` and kept: a snapshot serves many
        decisions until the next one arrives, and each looks at the same figures. (The
        arguments are passed, not closed over: a closure per call was a fifth of a decision's
        cost at 64 instances.)"""
        try:
            return self.__dict__["_derived"][key]
        except KeyError:  # (no memo yet, or not this key: `setdefault` would build a dict each call)
            value = compute(self, *args)
            self.__dict__.setdefault("_derived", {})[key] = value
            return value

    def without(self, gone: frozenset[str]) -> InstanceSnapshot:
        """The snapshot less requests that have left the instance since it was taken (finished
        or migrated away), with the blocks they held counted free: the engine frees them at its
        next step, and a policy that still saw them would move work off the instance twice."""
        if not gone & self.request_ids:
            return self
        leaving = [r for r in self.running + self.waiting if r.request_id in gone]
        return dataclasses.replace(
            self,
            used_blocks=max(0, self.used_blocks - sum(r.num_blocks for r in leaving)),
            running=tuple(r for r in self.running if r.request_id not in gone),
            waiting=tuple(r for r in self.waiting if r.request_id not in gone),
        )

    def with_pending(self, pending: tuple[RequestLoad, ...]) -> InstanceSnapshot:
        """The snapshot as it will look once requests already sent to it arrive (queued last).
        Its totals are this snapshot's plus the pending requests', without a second pass."""
        if not pending:
            return self
        combined = dataclasses.replace(self, waiting=self.waiting + pending)
        combined.__dict__["totals"] = self.totals.plus(LoadTotals.of(pending))
        return combined


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class InstanceView:
    """What a policy sees of one instance: its id, its load, and whether it takes new work.

    `draining` instances take no new requests and count as infinitely loaded, so migration
    empties them.
    """

    instance_id: str
    snapshot: InstanceSnapshot
    accepting: bool = True
    draining: bool = False
