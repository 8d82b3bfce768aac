"""Whether a destination may take over a request: decided from snapshots alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.migration import MigrationRejected, check_destination
from llumnix_server.errors import REFUSAL_STATUS
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, RequestLoad

BLOCK = 16


def view(instance_id: str, total: int = 100, used: int = 0, waiting_demand: int = 0, **kw) -> InstanceView:
    waiting = (RequestLoad("w", 0, 0, 0, waiting_demand),) if waiting_demand else ()
    return InstanceView(instance_id, InstanceSnapshot(total, used, BLOCK, waiting=waiting), **kw)


VIEWS = {"a": view("a"), "b": view("b"), "busy": view("busy", used=97), "queued": view("queued", waiting_demand=97),
         "closed": view("closed", accepting=False), "draining": view("draining", draining=True)}


def test_a_destination_with_room_is_accepted() -> None:
    check_destination(VIEWS, "a", "b", num_tokens=50 * BLOCK)


@pytest.mark.parametrize(
    ("destination", "status", "words"),
    [
        ("a", 400, "already runs on instance 'a'"),
        ("nope", 404, "no instance 'nope'"),
        ("closed", 400, "does not accept"),
        ("draining", 400, "does not accept"),
        ("busy", 400, "no room: the request needs 5 KV blocks, 3 are free"),
        ("queued", 400, "no room"),  # blocks the queue already needs are not free to take
    ],
)
def test_rejections_name_the_reason(destination: str, status: int, words: str) -> None:
    with pytest.raises(MigrationRejected) as caught:
        check_destination(VIEWS, "a", destination, num_tokens=4 * BLOCK + 3)
    assert REFUSAL_STATUS[caught.value.refusal] == status
    assert words in str(caught.value)


@given(total=st.integers(1, 500), used=st.integers(0, 500), tokens=st.integers(1, 10_000))
def test_room_is_exactly_the_free_blocks(total: int, used: int, tokens: int) -> None:
    used = min(used, total)
    views = {"a": view("a"), "b": view("b", total=total, used=used)}
    fits = -(-(tokens + 1) // BLOCK) <= total - used
    try:
        check_destination(views, "a", "b", tokens)
        assert fits
    except MigrationRejected:
        assert not fits


class _Transfer:
    closed = False

    def close(self) -> None:
        self.closed = True


class _Destination:
    """Only what the transfer's release looks at (a stand-in, not an engine)."""

    def __init__(self, snapshot: InstanceSnapshot) -> None:
        self.latest_snapshot = snapshot
        self.alive = True


def test_an_abandoned_transfer_outlives_the_destination_requests_that_read_it() -> None:
    """The preload's abort is on its way, but the destination still lists it: the transfer
    stays until a newer snapshot shows it gone (its KV load must find the transfer)."""
    import asyncio

    from llumnix_backend.migration import _close_once_released

    async def scenario() -> None:
        preload = RequestLoad("r1-preload-4", 0, 65, 0, 5)
        destination = _Destination(InstanceSnapshot(100, 0, BLOCK, waiting=(preload,), sequence=7))
        transfer = _Transfer()
        _close_once_released(transfer, destination, frozenset({"r1-preload-4"}), timeout_s=30)
        await asyncio.sleep(0.2)
        assert not transfer.closed
        destination.latest_snapshot = InstanceSnapshot(100, 0, BLOCK, sequence=8)  # the abort went through
        for _ in range(40):
            await asyncio.sleep(0.05)
            if transfer.closed:
                break
        assert transfer.closed
        # A destination that dies loads nothing: its transfer goes at once.
        dead, other = _Destination(InstanceSnapshot(100, 0, BLOCK, waiting=(preload,), sequence=3)), _Transfer()
        dead.alive = False
        _close_once_released(other, dead, frozenset({"r1-preload-4"}), timeout_s=30)
        await asyncio.sleep(0.1)
        assert other.closed

    asyncio.run(scenario())


def test_a_migrated_request_loads_its_kv_only_on_its_first_admission() -> None:
    """Preempted on its destination after it has generated there, a migrated request is
    recomputed: loading again would read a segment that is gone, and that never held the
    tokens generated since the switch."""
    from types import SimpleNamespace

    from llumnix_vllm.kv_transport import SegmentSpec
    from llumnix_vllm.migration_connector import _segment_of, segment_params

    params = segment_params(SegmentSpec("/dev/shm/llumnix-kv-x", 9, 262144, False))
    assert _segment_of(SimpleNamespace(kv_transfer_params=params, num_output_tokens=0)) is not None
    assert _segment_of(SimpleNamespace(kv_transfer_params=params, num_output_tokens=288)) is None
    assert _segment_of(SimpleNamespace(kv_transfer_params=None, num_output_tokens=0)) is None


def test_a_continuation_asks_for_prompt_logprobs_only_before_the_first_token() -> None:
    """They come with the first generated token: a request continued after it (migrated,
    replayed) must not send them again, nor those of its longer prompt; one lost before it must."""
    from llumnix_backend.requests import GenerationRequest

    request = GenerationRequest("r", (5, 6, 7), {"max_tokens": 10, "logprobs": 1, "prompt_logprobs": 2})
    assert request.continued((5, 6, 7)).sampling == request.sampling
    assert request.continued((5, 6, 7, 8, 9)).sampling == {"max_tokens": 8, "logprobs": 1}
