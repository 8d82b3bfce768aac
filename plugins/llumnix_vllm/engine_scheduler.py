"""The scheduler vLLM runs inside each engine process (`SchedulerConfig.scheduler_cls`).

It is vLLM's own scheduler plus a load reporter: after every change of state (a request added,
finished, aborted or preempted; decode progress at most every 10 ms) it publishes an
`InstanceSnapshot` to the front end, and a heartbeat re-sends the latest one while the engine
idles, so the front end always holds a fresh view without ever asking the engine (and waiting
on it).

It says which of a request's KV blocks a migration stage copies (`llumnix_export_plan`): the
scheduler, not the workers, knows which tokens have landed. For a migration's final stage it
stops a request: the request stays, holding its KV blocks, but is not scheduled, until the
migration resumes it (it gave up) or aborts it (the destination took over). The front end
reaches these through EngineCore utility methods registered below, which run between engine
steps.

Under vLLM's async scheduling (`LlumnixAsyncScheduler`, picked wherever vLLM turns async
scheduling on) a step can be in flight while a utility method runs: the request's newest
token is not known yet and its KV is being written. The final stage then stops the request
and answers "in flight"; the front end asks again, and the next engine iteration has landed
that step (vLLM keeps at most one step in flight between iterations).

It also ends the engine process if the server that started it disappears without shutting it
down (killed with SIGKILL, say), so no engine outlives its server.

With `LLUMNIX_STEP_TRACE_DIR` set, each engine appends one CSV row per step to a file there
(what the step computed and how long it took): the data the simulator's step-time profiles
are fitted to (`benchmarks/step_profile.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.core import EngineCore
from vllm.v1.request import RequestStatus

from llumnix_backend.snapshot import (
    KV_RESIDENCY_BOUNDS,
    STEP_TOKEN_BOUNDS,
    BucketCounter,
    InstanceSnapshot,
    KvResidency,
    RequestLoad,
    SpecDecodeTally,
    blocks_for,
)
from llumnix_vllm.snapshot_channel import SnapshotPublisher, server_pid, snapshot_address

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.05
STEP_REPORT_INTERVAL_S = 0.01
STEP_TRACE_ENV = "LLUMNIX_STEP_TRACE_DIR"
STEP_TRACE_HEADER = "step_s,prefill_tokens,decode_seqs,context_tokens\n"
IN_FLIGHT = "in_flight"  # the final stage's answer while the request's last step has not landed

# vLLM appends "-" and 8 random characters to the id the front end gave a request.
_INTERNAL_ID_SUFFIX_LEN = 9


def external_request_id(internal_id: str) -> str:
    if len(internal_id) > _INTERNAL_ID_SUFFIX_LEN and internal_id[-_INTERNAL_ID_SUFFIX_LEN] == "-":
        return internal_id[:-_INTERNAL_ID_SUFFIX_LEN]
    return internal_id


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What a migration stage copies: `block_ids` hold positions `first_block` to `end`."""

    token_ids: list[int]  # prompt + generated, as landed; all but the last have their KV
    block_ids: list[int]
    end: int


class LlumnixScheduler(Scheduler):
    """vLLM's scheduler with Llumnix's hooks; `LlumnixAsyncScheduler` where vLLM schedules
    asynchronously. vLLM names one scheduler class before it decides on async scheduling, so
    this one picks its variant when vLLM instantiates it. (The variant is a mixin over
    `AsyncScheduler`, as vLLM's own `DiffusionAsyncScheduler` is.)"""

    def __new__(cls, vllm_config, *args: Any, **kwargs: Any):
        asynchronous = vllm_config.scheduler_config.async_scheduling
        chosen = LlumnixAsyncScheduler if cls is LlumnixScheduler and asynchronous else cls
        return super().__new__(chosen)

    def __init__(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        # With a step in flight (async scheduling), vLLM returns the blocks of a request it
        # frees only once that step has landed whenever a KV connector may load into them
        # (ours is `kv_both`): a load that is not ordered after the step's writes could be
        # overwritten by them. The migration connector's load is ordered: the worker copies the
        # blocks in on the step's own stream, before its forward pass. And deferring costs a
        # great deal on vLLM 0.26: a preempted request's blocks then free nothing this step, so
        # the scheduler preempts victim after victim for one allocation (vllm#49674; most of
        # async scheduling's extra preemptions on the H200, by the simulator: docs/scheduling.md).
        self.defer_block_free = False
        self._publisher = SnapshotPublisher(snapshot_address(vllm_config.instance_id))
        self._sequence = 0
        self._num_preemptions = 0
        self._step_tokens = BucketCounter(STEP_TOKEN_BOUNDS)  # steps by tokens scheduled
        # vLLM samples block residency only with `kv_cache_metrics` on. Its stats hand what was
        # sampled to the front end's stat loggers, which record nothing here, so it is taken
        # first (see `update_from_output`).
        self._residency_sampler = getattr(self, "kv_metrics_collector", None)
        self._residency = tuple(BucketCounter(KV_RESIDENCY_BOUNDS) for _ in range(3))
        self._spec_decode = (SpecDecodeTally(accepted_per_position=(0,) * self.num_spec_tokens)
                             if self.num_spec_tokens else None)  # (None: it does not speculate)
        self._reported_shape: tuple[int, int, int] | None = None
        self._reported_at = 0.0
        self._block_pool = self.kv_cache_manager.block_pool
        # The null block is never handed out, so it counts neither as capacity nor as usage.
        self._total_blocks = self._block_pool.num_gpu_blocks - 1
        kv_config = self.kv_cache_config
        # A block's bytes on all ranks together (the scheduler's config describes one rank).
        self._block_bytes = (sum(t.size for t in kv_config.kv_cache_tensors) // max(1, kv_config.num_blocks)
                             * vllm_config.parallel_config.tensor_parallel_size)
        self._heartbeat = _Heartbeat(self._publisher, server_pid(vllm_config.instance_id))
        self._stopped: set[str] = set()  # internal ids of requests in a migration's final stage
        self._trace = _StepTrace.from_env()
        self._publish()

    # --- vLLM scheduler hooks: publish after each change of state -----------------------------

    def add_request(self, request, *args: Any, **kwargs: Any):
        result = super().add_request(request, *args, **kwargs)
        self._publish()
        return result

    def finish_requests(self, *args: Any, **kwargs: Any):
        result = super().finish_requests(*args, **kwargs)
        self._forget_finished_stopped()
        self._publish()
        return result

    def schedule(self, *args: Any, **kwargs: Any):
        if self._trace is not None:
            self._trace.began = time.perf_counter()
        if not self._stopped:  # every step: nothing to look through unless a migration stopped one
            return super().schedule(*args, **kwargs)
        stopped = [r for r in self.running if r.request_id in self._stopped]
        # Out of `running` for the step, a stopped request is neither scheduled nor preempted;
        # it still counts against the running limit, so it can come back into the batch.
        self.running = [r for r in self.running if r.request_id not in self._stopped]
        self.max_num_running_reqs -= len(stopped)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.max_num_running_reqs += len(stopped)
            self.running.extend(stopped)

    def has_requests(self) -> bool:
        # Stopped requests alone must not keep the engine stepping (empty steps, a busy loop):
        # it then waits for its next message, which is the migration's resume or abort.
        only_stopped = (
            bool(self._stopped)
            and self.get_num_unfinished_requests() == len(self._stopped)
            and not self.has_finished_requests()
        )
        return super().has_requests() and not only_stopped

    def make_stats(self, spec_decoding_stats=None, *args: Any, **kwargs: Any):
        # A step's speculative decoding, as vLLM hands it to its stat loggers (which record
        # nothing here: the snapshots carry it instead).
        if spec_decoding_stats is not None and self._spec_decode is not None:
            s = spec_decoding_stats
            self._spec_decode = self._spec_decode.plus(s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens,
                                                       s.num_accepted_tokens_per_pos)
        return super().make_stats(spec_decoding_stats, *args, **kwargs)

    def update_from_output(self, scheduler_output, *args: Any, **kwargs: Any):
        if self._trace is not None:
            self._trace.record(scheduler_output, self.requests)
        if scheduled := scheduler_output.total_num_scheduled_tokens:
            self._step_tokens.observe(scheduled)
        if self._residency_sampler is not None:  # (before vLLM's own stats drain it)
            lifetime, idle, reuse_gap = self._residency
            for event in self._residency_sampler.drain_events():
                lifetime.observe(event.lifetime_seconds)
                idle.observe(event.idle_seconds)
                for gap in event.reuse_gaps_seconds:
                    reuse_gap.observe(gap)
        result = super().update_from_output(scheduler_output, *args, **kwargs)
        if self._stopped:  # (under async scheduling a stopped request's step in flight can finish it)
            self._forget_finished_stopped()
        # A decode step that only grew the running requests by a token each changes little:
        # report it at most every STEP_REPORT_INTERVAL_S. Any change of who runs or waits (a
        # request finished, admitted or preempted) is reported at once.
        if self._shape() != self._reported_shape or time.monotonic() - self._reported_at >= STEP_REPORT_INTERVAL_S:
            self._publish()
        return result

    def _preempt_request(self, *args: Any, **kwargs: Any):
        self._num_preemptions += 1
        return super()._preempt_request(*args, **kwargs)

    def shutdown(self) -> None:
        if self._trace is not None:
            self._trace.close()
        self._heartbeat.stop()
        self._publisher.close()
        super().shutdown()

    # --- migration's final stage --------------------------------------------------------------

    def _decoding_request(self, request_id: str):
        """The running request the front end calls `request_id`, or why it is not decoding here."""
        request = next((r for r in self.running if external_request_id(r.request_id) == request_id), None)
        if request is None:
            waiting = any(external_request_id(r.request_id) == request_id for q in self._waiting_queues() for r in q)
            if waiting:
                return "it waits in the engine's queue"
            # (which of its requests the engine knows it as, and in what state: for the report)
            known = [f"{r.request_id} {r.status.name}" for r in self.requests.values()
                     if external_request_id(r.request_id) == request_id]
            return f"the engine does not run it ({', '.join(known) or 'no such request'}; {len(self.running)} running)"
        if not self._request_load(request, 0).decoding:
            return f"it is in prefill ({request.num_computed_tokens} of {request.num_tokens} tokens computed)"
        return request

    def llumnix_export_plan(self, request_id: str, first_block: int, capacity_blocks: int,
                            include_partial: bool, max_blocks: int | None = None) -> ExportPlan | str:
        """The blocks of a decoding request to copy from position `first_block` on: full ones
        only, or also the last partial one with `include_partial`; at most `max_blocks`. Or why
        the request is not decoding here. Every landed token but the newest has its KV computed
        (under async scheduling, the newest one's KV may be in flight: it is not copied)."""
        request = self._decoding_request(request_id)
        if isinstance(request, str):
            return request
        token_ids = list(request.all_token_ids)
        with_kv = len(token_ids) - 1
        end = -(-with_kv // self.block_size) if include_partial else with_kv // self.block_size
        if max_blocks is not None:
            end = min(end, first_block + max_blocks)
        if end > capacity_blocks:
            raise ValueError(f"request {request_id} needs {end} blocks, the segment holds {capacity_blocks}")
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)[0]
        return ExportPlan(token_ids, list(block_ids[first_block:end]), end)

    def llumnix_stop(self, request_id: str) -> str | None:
        """Stop scheduling the decoding request the front end calls `request_id` (again, if
        stopped already): IN_FLIGHT while a step of it has not landed, or why it is not decoding
        here (and nothing is stopped), else None."""
        request = self._decoding_request(request_id)
        if isinstance(request, str):
            return request
        self._stopped.add(request.request_id)
        return IN_FLIGHT if request.num_output_placeholders else None

    def _forget_finished_stopped(self) -> None:
        self._stopped = {i for i in self._stopped if i in self.requests and not self.requests[i].is_finished()}

    def llumnix_resume(self, request_id: str) -> None:
        self._stopped = {i for i in self._stopped if external_request_id(i) != request_id}

    # --- snapshot -----------------------------------------------------------------------------

    def _shape(self) -> tuple[int, int, int]:
        return len(self.running), sum(len(q) for q in self._waiting_queues()), self._num_preemptions

    def _waiting_queues(self) -> list:
        # vLLM 0.32 queues waiting requests that hold KV blocks apart; 0.26 (GPU) has one queue.
        return [self.waiting, getattr(self, "kv_holding_waiting", ())]

    def _request_load(self, request, blocks_held: int) -> RequestLoad:
        needed = blocks_for(request.num_tokens, self.block_size)
        return RequestLoad(
            request_id=external_request_id(request.request_id),
            priority=request.priority,
            num_tokens=request.num_tokens,
            num_blocks=blocks_held,
            demand_blocks=max(0, needed - blocks_held),
            # Decoding: every token but the newest sampled one has its KV computed.
            decoding=request.num_output_tokens > 0 and request.num_computed_tokens >= request.num_tokens - 1,
            preempted=request.status == RequestStatus.PREEMPTED,
        )

    def _blocks_held(self, request_id: str) -> int:
        managers = self.kv_cache_manager.coordinator.single_type_managers
        return len(managers[0].req_to_blocks.get(request_id, ())) if managers else 0

    def _snapshot(self) -> InstanceSnapshot:
        running = tuple(
            dataclasses.replace(
                self._request_load(r, self._blocks_held(r.request_id)), demand_blocks=0
            )
            for r in self.running
        )
        waiting = tuple(
            self._request_load(r, self._blocks_held(r.request_id)) for q in self._waiting_queues() for r in q
        )
        self._sequence += 1
        snapshot = InstanceSnapshot(
            total_blocks=self._total_blocks,
            used_blocks=self._total_blocks - self._block_pool.get_num_free_blocks(),
            block_size=self.block_size,
            block_bytes=self._block_bytes,
            running=running,
            waiting=waiting,
            num_preemptions=self._num_preemptions,
            num_deferred=len(getattr(self, "deferred_waiting", ())),  # (a vLLM without the set defers none)
            timestamp=time.monotonic(),
            sequence=self._sequence,
            engine_pid=os.getpid(),
            step_tokens=self._step_tokens.tally(),
            kv_residency=None if self._residency_sampler is None else KvResidency(
                *(counter.tally() for counter in self._residency)),
            spec_decode=self._spec_decode,
        )
        _ = snapshot.totals  # summed here, in the engine process, and pickled along with it
        return snapshot

    def _publish(self) -> None:
        self._reported_shape = self._shape()
        self._reported_at = time.monotonic()
        # A reporting failure must never take the engine down; the front end sees a stale
        # snapshot and treats the instance accordingly.
        try:
            self._heartbeat.publish(self._snapshot())
        except Exception:  # noqa: BLE001
            logger.exception("llumnix: could not publish a load snapshot")


class LlumnixAsyncScheduler(LlumnixScheduler, AsyncScheduler):
    """Llumnix's hooks over vLLM's `AsyncScheduler` (see the module docstring)."""


def _save_blocks(engine_core: EngineCore, plan: ExportPlan, segment: dict[str, Any], first_block: int) -> dict[str, Any]:
    engine_core.collective_rpc("llumnix_save_blocks", args=(segment, plan.block_ids, first_block))
    return {"token_ids": plan.token_ids, "blocks": plan.end}


def _export_kv(engine_core: EngineCore, request_id: str, first_block: int, segment: dict[str, Any],
               max_blocks: int) -> dict[str, Any]:
    """A pre-copy stage: the request's full blocks from `first_block` on, at most `max_blocks`."""
    plan = engine_core.scheduler.llumnix_export_plan(request_id, first_block, segment["capacity_blocks"],
                                                     include_partial=False, max_blocks=max_blocks)
    if isinstance(plan, str):
        return {"not_exported": plan}
    return _save_blocks(engine_core, plan, segment, first_block)


def _stop_and_export_kv(engine_core: EngineCore, request_id: str, first_block: int,
                        segment: dict[str, Any]) -> dict[str, Any]:
    """Stop the request and copy the rest of its KV in one go between two engine steps, so that
    no step can run in between; `{IN_FLIGHT: True}` (stopped, nothing copied) while a step of
    it is still in flight."""
    scheduler = engine_core.scheduler
    why_not = scheduler.llumnix_stop(request_id)
    if why_not == IN_FLIGHT:
        return {IN_FLIGHT: True}
    if why_not:
        return {"not_exported": why_not}
    try:
        plan = scheduler.llumnix_export_plan(request_id, first_block, segment["capacity_blocks"], include_partial=True)
        assert isinstance(plan, ExportPlan), plan  # (llumnix_stop found it decoding)
        return _save_blocks(engine_core, plan, segment, first_block)
    except BaseException:
        scheduler.llumnix_resume(request_id)
        raise


def _resume_request(engine_core: EngineCore, request_id: str) -> None:
    engine_core.scheduler.llumnix_resume(request_id)


# `engine_core.call_utility_async(name, ...)` reaches EngineCore methods by name; vLLM has no other
# way for the front end to reach the scheduler.
EngineCore.llumnix_export_kv = _export_kv
EngineCore.llumnix_stop_and_export_kv = _stop_and_export_kv
EngineCore.llumnix_resume_request = _resume_request


class _StepTrace:
    """One CSV row per engine step: its duration (from scheduling to its output), the prompt
    tokens it computed, and the decoding requests with the context they attend to."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - open for the engine's life
        if self._file.tell() == 0:
            self._file.write(STEP_TRACE_HEADER)
        self.began: float | None = None

    @staticmethod
    def from_env() -> _StepTrace | None:
        folder = os.environ.get(STEP_TRACE_ENV)
        return _StepTrace(os.path.join(folder, f"steps-{os.getpid()}.csv")) if folder else None

    def record(self, scheduler_output, requests: dict) -> None:
        if self.began is None or not scheduler_output.total_num_scheduled_tokens:
            return
        prefill = decodes = context = 0
        for request_id, n in scheduler_output.num_scheduled_tokens.items():
            request = requests.get(request_id)
            if request is not None and n == 1 and request.num_output_tokens > 0:
                decodes += 1
                context += request.num_computed_tokens
            else:
                prefill += n
        self._file.write(f"{time.perf_counter() - self.began:.6f},{prefill},{decodes},{context}\n")
        self.began = None

    def close(self) -> None:
        self._file.close()


class _Heartbeat:
    """Re-sends the latest snapshot while the engine is idle; ends the engine if orphaned."""

    def __init__(self, publisher: SnapshotPublisher, owner_pid: int) -> None:
        self._publisher = publisher
        self._lock = threading.Lock()  # zmq sockets are not thread-safe
        self._latest: InstanceSnapshot | None = None
        self._last_sent = 0.0
        self._owner_pid = owner_pid
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="llumnix-heartbeat", daemon=True).start()

    def publish(self, snapshot: InstanceSnapshot) -> None:
        with self._lock:
            self._latest = snapshot
            self._last_sent = snapshot.timestamp
            self._publisher.send(snapshot)

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(HEARTBEAT_INTERVAL_S):
            if os.getppid() != self._owner_pid:
                logger.warning("llumnix: the server that started this engine is gone; exiting")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            with self._lock:
                now = time.monotonic()
                if self._latest is not None and now - self._last_sent >= HEARTBEAT_INTERVAL_S:
                    self._latest = dataclasses.replace(self._latest, timestamp=now)
                    _ = self._latest.totals  # as `_snapshot` does: summed here, not in the front end
                    self._last_sent = now
                    self._publisher.send(self._latest)
