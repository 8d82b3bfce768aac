"""The engine-side half of a migration stage, over a scheduler's state as vLLM keeps it: which
blocks a stage copies, and the final stage's stop under async scheduling, where a step of the
request can still be in flight. (vLLM's CPU build turns async scheduling off, so the end-to-end
tests never reach that path; these do, and the H200 runs in docs/performance.md did.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from llumnix_vllm.engine_scheduler import IN_FLIGHT, ExportPlan, LlumnixAsyncScheduler, LlumnixScheduler
from vllm.v1.request import RequestStatus

BLOCK = 16


@dataclass
class FakeRequest:
    """The fields of vLLM's `Request` the hooks read."""

    request_id: str
    prompt: int
    generated: int
    num_computed_tokens: int
    num_output_placeholders: int = 0
    priority: int = 0
    status: RequestStatus = RequestStatus.RUNNING
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(range(self.prompt + self.generated))

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.generated


def scheduler(running=(), waiting=()) -> LlumnixScheduler:
    """A LlumnixScheduler holding only what the hooks read: its queues, the block size and each
    request's block table (block i of request r is r's index * 1000 + i)."""
    state = object.__new__(LlumnixScheduler)
    state.running, state.waiting, state.block_size, state._stopped = list(running), list(waiting), BLOCK, set()
    state.requests = {r.request_id: r for r in [*running, *waiting]}
    tables = {r.request_id: [n * 1000 + i for i in range(-(-r.num_tokens // BLOCK))]
              for n, r in enumerate([*running, *waiting])}
    state.kv_cache_manager = SimpleNamespace(get_block_ids=lambda request_id: (tables[request_id],))
    return state


def decoding(prompt: int = 40, generated: int = 10, in_flight: bool = False) -> FakeRequest:
    """A decoding request as the front end calls it "req" (vLLM adds a suffix to the id).
    Without a step in flight every token but the newest has its KV; with one, the newest
    token's KV is being computed and the token it samples has not landed."""
    tokens = prompt + generated
    return FakeRequest("req-0123abcd", prompt, generated, num_computed_tokens=tokens if in_flight else tokens - 1,
                       num_output_placeholders=int(in_flight))


def test_the_async_variant_is_picked_where_vllm_schedules_asynchronously() -> None:
    def config(asynchronous: bool) -> SimpleNamespace:
        return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=asynchronous))

    assert type(LlumnixScheduler.__new__(LlumnixScheduler, config(True))) is LlumnixAsyncScheduler
    assert type(LlumnixScheduler.__new__(LlumnixScheduler, config(False))) is LlumnixScheduler
    assert type(LlumnixAsyncScheduler.__new__(LlumnixAsyncScheduler, config(True))) is LlumnixAsyncScheduler


@pytest.mark.parametrize("in_flight", [False, True])
def test_a_stage_copies_the_full_blocks_of_the_landed_tokens(in_flight: bool) -> None:
    request = decoding(prompt=40, generated=10, in_flight=in_flight)  # 50 landed tokens: 49 with KV
    plan = scheduler([request]).llumnix_export_plan("req", first_block=1, capacity_blocks=8, include_partial=False)
    assert plan == ExportPlan(list(range(50)), [1, 2], 3)  # blocks 1 and 2 of 0-2 (48 tokens)


def test_the_final_stage_copies_the_partial_block_too_and_at_most_max_blocks_earlier() -> None:
    state = scheduler([decoding(prompt=40, generated=10)])
    assert state.llumnix_export_plan("req", 3, 8, include_partial=True) == ExportPlan(list(range(50)), [3], 4)
    assert state.llumnix_export_plan("req", 0, 8, include_partial=False, max_blocks=2).block_ids == [0, 1]


def test_a_segment_too_small_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs 4 blocks, the segment holds 3"):
        scheduler([decoding()]).llumnix_export_plan("req", 0, 3, include_partial=True)


def test_requests_that_do_not_decode_here_say_why() -> None:
    prefill = FakeRequest("pre-0123abcd", prompt=100, generated=0, num_computed_tokens=32)
    queued = FakeRequest("queued-0123abcd", prompt=8, generated=0, num_computed_tokens=0,
                         status=RequestStatus.WAITING)
    state = scheduler([prefill], [queued])
    assert state.llumnix_export_plan("pre", 0, 8, include_partial=False) == "it is in prefill (32 of 100 tokens computed)"
    assert state.llumnix_stop("queued") == "it waits in the engine's queue"
    assert state.llumnix_stop("gone") == "the engine does not run it (no such request; 1 running)"
    # One it knows but does not run (here: finished, its blocks not yet freed) is named, with its state.
    finished = FakeRequest("done-0123abcd", prompt=8, generated=3, num_computed_tokens=10,
                           status=RequestStatus.FINISHED_LENGTH_CAPPED)
    state.requests[finished.request_id] = finished
    assert state.llumnix_stop("done") == ("the engine does not run it (done-0123abcd FINISHED_LENGTH_CAPPED; "
                                          "1 running)")
    assert not state._stopped


def test_the_final_stage_waits_out_a_step_in_flight() -> None:
    request = decoding(in_flight=True)
    state = scheduler([request])
    assert state.llumnix_stop("req") == IN_FLIGHT
    assert state._stopped == {request.request_id}  # stopped at once: no further step includes it
    # The step lands: its token is known, and every token but it has its KV.
    request.all_token_ids.append(50)
    request.generated += 1
    request.num_output_placeholders = 0
    assert state.llumnix_stop("req") is None  # asked again: stopped, nothing in flight
    assert state.llumnix_export_plan("req", 0, 8, include_partial=True) == ExportPlan(list(range(51)), [0, 1, 2, 3], 4)
    state.llumnix_resume("req")
    assert not state._stopped
