"""`ServedModel` carrying out its control loop's plans (starts, the instance count, retirement,
loss, replay, restarts) over fake engines (`fake_engine`: scripted stand-ins, not vLLM). The
planner's decisions are tested on their own in test_control.py; the same paths on real vLLM
engines are in the recovery and live-repository e2e tests."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llumnix_backend.config import ModelSource, parse_model_config
from llumnix_backend.metrics import ServerMetrics
from llumnix_backend.plugin import EngineDead
from llumnix_backend.requests import GenerationRequest
from llumnix_backend.served_model import InstanceStarts, ServedModel

from fake_engine import FakeRuntime, token_at

FAST_HEALTH = {"stale_after_s": 0.3, "restart_backoff_s": 0.05, "max_restart_backoff_s": 0.2,
               "replay_timeout_s": 5, "drain_timeout_s": 5}
WAIT_S = 20  # generous: these run in milliseconds, but the machine may be busy


def source(instances: int = 2, **scheduler) -> ModelSource:
    config = parse_model_config({
        "instances": instances, "engine": {"model": "fake"},
        "scheduler": {"dispatch_policy": "round_robin", "migration": {"rescheduling": False, "interval_s": 0.02},
                      **scheduler, "health": {**FAST_HEALTH, **scheduler.get("health", {})}},
    }, "fake/config.yaml")
    return ModelSource(config, "fake/config.yaml", "fake/config.yaml", Path("."))


def starts() -> InstanceStarts:
    return InstanceStarts(asyncio.Semaphore(4), lambda event: None)


async def started(runtime: FakeRuntime, instances: int = 2, **scheduler) -> ServedModel:
    """A model of `instances` over `runtime`'s engines, started."""
    model = ServedModel("fake", source(instances, **scheduler), runtime, ServerMetrics(lambda: [], ("ready",)))
    await model.start(starts())
    return model


def states(model: ServedModel) -> dict[str, str]:
    return {r.instance_id: r.state for r in model.reports()}


async def until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Stream:
    """One request streaming from the model in the background."""

    def __init__(self, model: ServedModel, request_id: str, max_tokens: int, prompt: tuple[int, ...] = (5, 6, 7)):
        self.tokens: list[int] = []
        self.request_id, self.prompt = request_id, prompt
        request = GenerationRequest(request_id, prompt, {"max_tokens": max_tokens}, arrival_time=time.monotonic())
        self.task = asyncio.create_task(self._run(model.generate(request)))

    async def _run(self, deltas) -> str | None:
        finish = None
        async for delta in deltas:
            self.tokens.extend(delta.token_ids)
            finish = delta.finish_reason or finish
        return finish

    async def decoding(self) -> None:
        await until(lambda: len(self.tokens) >= 5, f"tokens of {self.request_id}")

    def expected(self, n: int) -> list[int]:
        """What an undisturbed run generates."""
        return [token_at(len(self.prompt) + k) for k in range(n)]


def run(scenario) -> None:
    async def guarded() -> None:
        await asyncio.wait_for(scenario(), 60)

    asyncio.run(guarded())


def test_the_model_starts_its_count_and_a_dead_instance_replays_and_restarts() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        model = await started(runtime)
        assert states(model) == {"0": "ready", "1": "ready"}
        streams = [Stream(model, f"r{k}", 300) for k in range(4)]  # round robin: two on each
        await asyncio.gather(*(s.decoding() for s in streams))
        first = runtime.engines["0"]
        assert first.request_ids == {"r0", "r2"}
        first.die()
        await until(lambda: states(model)["0"] == "failed", "the death noticed")
        await until(lambda: states(model)["0"] == "ready" and runtime.engines["0"] is not first, "the restart")
        for stream in streams:
            assert await stream.task == "length"
            assert stream.tokens == stream.expected(300)  # replayed: nothing lost, repeated or reordered
        assert first.shut_down
        await model.shutdown()

    run(scenario)


def test_a_hung_engine_is_lost_its_requests_continue_and_it_is_restarted() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        model = await started(runtime)
        stream = Stream(model, "r0", 400)
        await stream.decoding()
        hung = runtime.engines["0"]
        hung.hang()
        assert await stream.task == "length" and stream.tokens == stream.expected(400)
        await until(lambda: runtime.engines["0"] is not hung and states(model)["0"] == "ready", "the restart")
        await model.shutdown()

    run(scenario)


def test_with_every_instance_dead_a_request_waits_for_a_restart_and_the_model_says_why() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        model = await started(runtime, instances=1, health={"restart_backoff_s": 0.5})
        stream = Stream(model, "r0", 200)
        await stream.decoding()
        runtime.engines["0"].die("the engine process was killed by SIGKILL")
        await until(lambda: not model.ready, "the model unavailable")
        assert "SIGKILL" in model.unavailable_reason()
        assert await stream.task == "length" and stream.tokens == stream.expected(200)
        assert model.ready and model.unavailable_reason() == ""
        await model.shutdown()

    run(scenario)


def test_a_request_fails_clearly_when_no_instance_comes_back() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        model = await started(runtime, instances=1, health={"restart": False, "replay_timeout_s": 0.2})
        stream = Stream(model, "r0", 2000)
        await stream.decoding()
        runtime.engines["0"].die()
        with pytest.raises(EngineDead, match="could take over its requests within 0.2 s"):
            await stream.task
        await model.shutdown()

    run(scenario)


def test_a_config_edit_adds_instances_before_it_returns_and_retires_the_newest_surplus() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        model = await started(runtime)
        await model.reconfigure(source(3), starts())
        assert states(model) == {"0": "ready", "1": "ready", "2": "ready"}
        # Without rescheduling, the retired instances' requests finish where they are.
        streams = [Stream(model, f"r{k}", 200) for k in range(3)]
        await until(lambda: all(s.tokens for s in streams), "tokens")
        began = time.monotonic()
        await model.reconfigure(source(1), starts())
        assert time.monotonic() - began < 1  # the reload does not wait for the drain
        assert states(model) == {"0": "ready", "1": "draining", "2": "draining"}
        for stream in streams:
            assert await stream.task == "length" and stream.tokens == stream.expected(200)
        await until(lambda: states(model) == {"0": "ready"}, "the surplus stopped")
        await until(lambda: runtime.engines["1"].shut_down and runtime.engines["2"].shut_down, "their engines stopped")
        await model.shutdown()

    run(scenario)


def test_a_retired_instance_evicts_what_runs_there_at_its_drain_deadline() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        model = await started(runtime, health={"drain_timeout_s": 0.3})
        streams = [Stream(model, f"r{k}", 400) for k in range(2)]  # one on each
        await asyncio.gather(*(s.decoding() for s in streams))
        await model.reconfigure(source(1, health={"drain_timeout_s": 0.3}), starts())
        await until(lambda: "1" not in states(model), "instance 1 stopped at its deadline", timeout_s=WAIT_S)
        await until(lambda: runtime.engines["1"].shut_down, "its engine stopped")
        for stream in streams:
            assert await stream.task == "length" and stream.tokens == stream.expected(400)
        assert runtime.engines["0"].request_ids == set()
        await model.shutdown()

    run(scenario)


def test_an_instance_that_never_started_waits_for_a_config_edit_that_retries_it() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        runtime.failing_starts = 1
        model = await started(runtime)
        assert sorted(states(model).values()) == ["failed", "ready"]
        failed = next(i for i, s in states(model).items() if s == "failed")
        await asyncio.sleep(0.3)  # many ticks: a start that failed is not retried by itself
        assert states(model)[failed] == "failed"
        await model.reconfigure(source(2, dispatch_policy="queue"), starts())
        assert sorted(states(model).values()) == ["ready", "ready"] and failed not in states(model)
        await model.shutdown()

    run(scenario)


def test_new_engines_take_over_and_the_old_ones_are_retired() -> None:
    async def scenario() -> None:
        old, new = FakeRuntime(), FakeRuntime()
        model = await started(old)
        stream = Stream(model, "r0", 300)
        await stream.decoding()
        assert await model.replace_engines(source(2, health={"drain_timeout_s": 0.2}), new, starts()) == ""
        assert states(model) == {"0": "draining", "1": "draining", "2": "ready", "3": "ready"}
        assert await stream.task == "length" and stream.tokens == stream.expected(300)
        await until(lambda: states(model) == {"2": "ready", "3": "ready"}, "the old instances stopped")
        await until(lambda: all(e.shut_down for e in old.engines.values()), "their engines stopped")
        # New engines that all fail to start change nothing.
        failing = FakeRuntime()
        failing.failing_starts = 2
        reason = await model.replace_engines(source(2), failing, starts())
        assert "no instance started" in reason and states(model) == {"2": "ready", "3": "ready"}
        await model.shutdown()

    run(scenario)


@pytest.mark.parametrize("seed", range(4))
def test_streams_survive_random_kills_hangs_and_reloads_and_nothing_is_left_running(seed: int) -> None:
    """Seeded sequences of what production throws at a model while it streams: engines killed
    or stopped, the instance count edited, the engines replaced. Every stream must end whole
    with an undisturbed run's tokens; the model must settle at its config's count; and once it
    shuts down, no engine it ever started may still run."""
    rng = random.Random(seed)

    async def scenario() -> None:
        runtimes = [FakeRuntime()]
        model = await started(runtimes[0])
        streams = [Stream(model, f"r{k}", rng.randrange(150, 400)) for k in range(6)]
        count = 2
        for _ in range(12):
            await asyncio.sleep(rng.uniform(0.02, 0.12))
            action = rng.choice(("kill", "kill", "hang", "count", "replace"))
            alive = [e for r in runtimes for e in r.engines.values() if e.alive]
            if action in ("kill", "hang") and alive:
                victim = rng.choice(alive)
                victim.die() if action == "kill" else victim.hang()
            elif action == "count":
                count = rng.randrange(1, 4)
                await model.reconfigure(source(count), starts())
            elif action == "replace":
                runtimes.append(FakeRuntime())
                await model.replace_engines(source(count), runtimes[-1], starts())
        for stream in streams:
            assert await stream.task == "length", stream.task
            assert stream.tokens == stream.expected(len(stream.tokens)) and len(stream.tokens) > 0
        await until(lambda: sorted(states(model).values()) == ["ready"] * count, f"{count} instances ready")
        await model.shutdown()
        left = [(k, e.instance_id, e._started, e._lost) for k, r in enumerate(runtimes) for e in r.engines.values()
                if not e.shut_down and e.alive]
        assert not left, left

    run(scenario)
