"""One simulated engine instance, stepping as vLLM V1's scheduler does (priority policy).

Per step: running requests first, in admission order, each getting its next chunk (the rest of
its prompt under the token budget, or one decode token); a request whose new tokens need a
block when none is free preempts the least urgent running request (highest priority value,
then latest arrival), which frees its blocks and goes back to the queue to be recomputed (with
`EngineProfile.defers_frees`, the blocks of a victim the step before ran come back only after
this step, so the scheduler goes on to the next victim, as vLLM 0.26 does then). Then,
only if nothing was preempted, queued requests are admitted in priority order while the budget,
`max_num_seqs` and free blocks allow (room for a request's whole sequence, not only its first
chunk, as vLLM checks); the head of the queue blocks the rest. A request whose
prompt is fully computed samples a token at the end of the step.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass, field

from llumnix_backend.simulator.profile import EngineProfile
from llumnix_backend.snapshot import InstanceSnapshot, RequestLoad


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(eq=False)
class SimRequest:
    """A request's state as it moves through instances."""

    request_id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    priority: int
    generated: int = 0
    computed: int = 0  # tokens whose KV is computed where it runs now
    blocks: int = 0  # KV blocks it holds where it runs now
    preempted: bool = False  # waiting to be recomputed after a preemption
    paused_until: float = 0.0  # after a migration's switch: resumes on its new instance then
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    num_preemptions: int = 0
    num_migrations: int = 0
    token_gaps: array = field(default_factory=lambda: array("d"))  # seconds between its tokens

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def decoding(self) -> bool:
        return self.generated > 0 and self.computed >= self.num_tokens - 1


class SimulatedInstance:
    def __init__(self, instance_id: str, profile: EngineProfile) -> None:
        self.instance_id = instance_id
        self.profile = profile
        self.free_blocks = profile.total_blocks
        self.running: list[SimRequest] = []
        self._waiting: list[tuple[int, float, int, SimRequest]] = []  # heap: (priority, arrival, seq, request)
        self._seq = 0
        self.num_preemptions = 0
        self.busy_until: float | None = None  # end of the step in progress
        self._scheduled: list[tuple[SimRequest, int]] = []
        self._ran_last: set[SimRequest] = set()  # the requests the step before ran (defers_frees)
        self._deferred_blocks = 0  # freed by preemptions this step, usable once it ends
        self._snapshot: InstanceSnapshot | None = None

    # --- work in ------------------------------------------------------------------------------

    def add(self, request: SimRequest) -> None:
        self._enqueue(request)
        self._snapshot = None

    def _enqueue(self, request: SimRequest) -> None:
        self._seq += 1
        heapq.heappush(self._waiting, (request.priority, request.arrival, self._seq, request))

    def requests(self) -> list[SimRequest]:
        """Every request here, running or queued."""
        return self.running + [r for _, _, _, r in self._waiting]

    @property
    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    # --- migration ----------------------------------------------------------------------------

    def remove_running(self, request: SimRequest) -> None:
        """The request leaves (migrated away): its blocks are freed here."""
        self.running.remove(request)
        self.free_blocks += request.blocks
        request.blocks = 0
        self._snapshot = None

    def has_room_for(self, request: SimRequest) -> bool:
        """Room for a migrated request's KV and its next token (the real room check's rule)."""
        return _blocks(request.num_tokens + 1, self.profile.block_size) <= self.free_blocks

    def take_over(self, request: SimRequest, resume_at: float) -> None:
        """Admit a migrated request with its KV in place (all but its newest token)."""
        needed = _blocks(request.num_tokens, self.profile.block_size)
        self.free_blocks -= needed
        request.blocks = needed
        request.computed = request.num_tokens - 1
        request.paused_until = resume_at
        request.num_migrations += 1
        self.running.append(request)
        self._snapshot = None

    # --- stepping -----------------------------------------------------------------------------

    def start_step(self, now: float) -> float | None:
        """Schedule one step; returns how long it takes, or None if there is nothing to run now."""
        profile = self.profile
        block_size = profile.block_size
        budget = profile.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        preempted = False
        prefill_tokens = decode_seqs = context_tokens = 0
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            if request.paused_until > now:
                i += 1
                continue
            n = min(request.num_tokens - request.computed, budget)
            needed = _blocks(request.computed + n, block_size) - request.blocks
            while needed > self.free_blocks:
                victim = max(running, key=lambda r: (r.priority, r.arrival))
                index = running.index(victim)
                self._preempt(victim)
                preempted = True
                for j, (r, tokens) in enumerate(scheduled):
                    if r is victim:
                        del scheduled[j]
                        budget += tokens
                        break
                if index < i:
                    i -= 1
                if victim is request:
                    break
            else:
                self.free_blocks -= needed
                request.blocks += needed
                budget -= n
                scheduled.append((request, n))
                i += 1
        if not preempted:
            waiting = self._waiting
            while waiting and budget > 0 and len(running) < profile.max_num_seqs:
                request = waiting[0][3]
                # vLLM admits a request only if its whole sequence fits, not just the first
                # chunk (`scheduler_reserve_full_isl`, on by default in 0.26 and 0.32).
                if _blocks(request.num_tokens, block_size) - request.blocks > self.free_blocks:
                    break
                n = min(request.num_tokens - request.computed, budget)
                needed = _blocks(request.computed + n, block_size) - request.blocks
                heapq.heappop(waiting)
                request.preempted = False
                self.free_blocks -= needed
                request.blocks += needed
                budget -= n
                running.append(request)
                scheduled.append((request, n))
        for request, n in scheduled:
            if request.decoding:
                decode_seqs += 1
                context_tokens += request.num_tokens
            else:
                prefill_tokens += n
        self._scheduled = scheduled
        if self.profile.defers_frees:
            self._ran_last = {r for r, _ in scheduled}
        self._snapshot = None
        if not scheduled:  # no step: nothing left in flight to wait for
            self.free_blocks += self._deferred_blocks
            self._deferred_blocks = 0
            return None
        return profile.step_time(prefill_tokens, decode_seqs, context_tokens)

    def _preempt(self, victim: SimRequest) -> None:
        self.running.remove(victim)
        if victim in self._ran_last:
            self._deferred_blocks += victim.blocks
        else:
            self.free_blocks += victim.blocks
        victim.blocks = 0
        victim.computed = 0
        victim.preempted = True
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(victim)

    def finish_step(self, now: float) -> list[SimRequest]:
        """Apply the step that just ended: computed tokens, sampled tokens. Returns the requests
        that finished (their blocks are freed)."""
        finished = []
        for request, n in self._scheduled:
            request.computed += n
            if request.computed < request.num_tokens:
                continue  # a prompt chunk: nothing sampled yet
            request.generated += 1
            if request.first_token_at is None:
                request.first_token_at = now
            else:
                request.token_gaps.append(now - request.last_token_at)
            request.last_token_at = now
            if request.generated >= request.output_tokens:
                request.finished_at = now
                self.running.remove(request)
                self.free_blocks += request.blocks
                request.blocks = 0
                finished.append(request)
        self._scheduled = []
        self.free_blocks += self._deferred_blocks
        self._deferred_blocks = 0
        self.busy_until = None
        self._snapshot = None
        return finished

    def in_current_step(self, request: SimRequest) -> bool:
        return any(r is request for r, _ in self._scheduled)

    # --- what the policies see ----------------------------------------------------------------

    def snapshot(self, now: float) -> InstanceSnapshot:
        """The snapshot the engine would publish now (built once per change of state)."""
        if self._snapshot is None:
            block_size = self.profile.block_size
            running = tuple(
                RequestLoad(r.request_id, r.priority, r.num_tokens, r.blocks, 0, r.decoding and r.paused_until <= now)
                for r in self.running)
            waiting = tuple(
                RequestLoad(r.request_id, r.priority, r.num_tokens, r.blocks,
                            max(0, _blocks(r.num_tokens, block_size) - r.blocks), False, r.preempted)
                for _, _, _, r in sorted(self._waiting))
            total = self.profile.total_blocks
            self._snapshot = InstanceSnapshot(total, total - self.free_blocks, block_size, running=running,
                                              waiting=waiting, num_preemptions=self.num_preemptions, timestamp=now)
        return self._snapshot
