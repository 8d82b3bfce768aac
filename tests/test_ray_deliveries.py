"""The network transport's destination side (`ray_cluster._Deliveries`): the position runs of
a migration are fetched as soon as they are announced and written in export order, however Ray
orders the calls that announce them; a failed run fails every wait that includes it."""

from __future__ import annotations

import asyncio

import pytest

ray_cluster = pytest.importorskip("llumnix_vllm.ray_cluster")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _recording() -> tuple[object, list[str], object]:
    """Deliveries whose writes are recorded in order, the record, and the write."""
    written: list[str] = []

    async def write(positions: str) -> None:
        written.append(positions)

    return ray_cluster._Deliveries(), written, write


def test_runs_are_written_in_export_order_whichever_call_arrives_first() -> None:
    async def scenario() -> None:
        deliveries, written, write = _recording()
        loop = asyncio.get_running_loop()
        run0, run1 = loop.create_future(), loop.create_future()
        deliveries.add(1, run1, write)  # the second run's call comes first, and its bytes too
        run1.set_result("run 1")
        both = asyncio.ensure_future(deliveries.written(2))
        await _settle()
        assert written == [] and not both.done()  # it waits for the run before it
        deliveries.add(0, run0, write)
        first = asyncio.ensure_future(deliveries.written(1))
        run0.set_result("run 0")
        await asyncio.wait_for(both, 5)
        assert first.done() and written == ["run 0", "run 1"]

    asyncio.run(scenario())


def test_a_failed_run_fails_the_waits_that_include_it_not_those_before() -> None:
    async def scenario() -> None:
        deliveries, written, write = _recording()
        loop = asyncio.get_running_loop()
        runs = [loop.create_future() for _ in range(3)]
        for index, data in enumerate(runs):
            deliveries.add(index, data, write)
        runs[0].set_result("run 0")
        runs[1].set_exception(OSError("the source's node went away"))
        runs[2].set_result("run 2")
        await asyncio.wait_for(deliveries.written(1), 5)
        for runs_needed in (2, 3):
            with pytest.raises(OSError, match="node went away"):
                await asyncio.wait_for(deliveries.written(runs_needed), 5)
        assert written == ["run 0"]  # nothing after the failed run is written

    asyncio.run(scenario())
