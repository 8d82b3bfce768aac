"""Failures of real vLLM engines under streaming load: an engine killed (SIGKILL), every engine
of a model killed, an engine hung (SIGSTOP). Requests in flight continue on another instance
(replay) with exactly the tokens of an undisturbed run, and the lost instance comes back.

These tests kill engines, so they run on a server of their own (`killable`, model `gamma`).
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from conftest import ENGINE_START_TIMEOUT_S
from llumnix_client import StreamedCompletion, engine_pid, instances, running_on

from llumnix_server.launcher import ServerProcess

MODEL = "gamma"  # on `killable`
TOKENS = 1500
RESTART_TIMEOUT_S = ENGINE_START_TIMEOUT_S


@pytest.fixture(scope="module")
def server(killable: ServerProcess) -> ServerProcess:
    return killable


@pytest.fixture(scope="module")
def baseline(server: ServerProcess) -> StreamedCompletion:
    """An undisturbed greedy run of the tests' request."""
    return StreamedCompletion(server, MODEL, max_tokens=TOKENS).result()


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def all_ready(server: ServerProcess) -> bool:
    return all(i["state"] == "ready" for i in instances(server, MODEL).values())


def counter(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"llumnix:{name}_total{{") and f'model_name="{MODEL}"' in line)


def streams_on(server: ServerProcess, count: int) -> list[StreamedCompletion]:
    runs = [StreamedCompletion(server, MODEL, max_tokens=TOKENS) for _ in range(count)]
    for run in runs:
        run.wait_for_tokens(20, timeout=60)
    return runs


def assert_whole(runs: list[StreamedCompletion], baseline: StreamedCompletion) -> None:
    """Every run is whole and the same as the undisturbed one: tokens, and text (the tiny
    model's byte-level tokens often split a character, and so does a replay)."""
    for run in runs:
        run.result()
        assert run.finish_reason == "length"
        assert len(run.token_ids) == TOKENS
        assert run.token_ids == baseline.token_ids
        assert "".join(run.text) == "".join(baseline.text)


def test_a_killed_engine_replays_its_requests_and_restarts(server, baseline) -> None:
    wait_until(lambda: all_ready(server), RESTART_TIMEOUT_S, "both instances ready")
    replays, restarts = counter(server, "replays"), counter(server, "instance_restarts")
    runs = streams_on(server, 4)
    victim = running_on(server, runs[0].request_id, MODEL)
    os.kill(engine_pid(server, victim, MODEL), signal.SIGKILL)
    assert_whole(runs, baseline)
    assert counter(server, "replays") > replays
    wait_until(lambda: all_ready(server), RESTART_TIMEOUT_S, f"instance {victim} restarted")
    assert counter(server, "instance_restarts") > restarts
    assert instances(server, MODEL)[victim]["error"] is None


def test_with_every_engine_killed_the_model_is_unavailable_until_one_is_back(server, baseline) -> None:
    wait_until(lambda: all_ready(server), RESTART_TIMEOUT_S, "both instances ready")
    runs = streams_on(server, 2)
    for instance in instances(server, MODEL):
        os.kill(engine_pid(server, instance, MODEL), signal.SIGKILL)

    def unavailable() -> dict | None:
        index = httpx.post(server.url + "/v2/repository/index", timeout=30).json()
        (entry,) = [e for e in index if e["name"] == MODEL]
        return entry if entry["state"] == "UNAVAILABLE" else None

    entry = wait_until(unavailable, 30, "the index shows the model unavailable", interval=0.05)
    assert "no instance serves" in entry["reason"] and "SIGKILL" in entry["reason"]
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready", timeout=30).status_code == 503
    # The requests in flight wait for an instance to come back, then finish whole.
    assert_whole(runs, baseline)
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready", timeout=30).status_code == 200
    wait_until(lambda: all_ready(server), RESTART_TIMEOUT_S, "both instances restarted")


def test_a_hung_engine_is_found_its_requests_replayed_and_it_restarts(server, baseline) -> None:
    wait_until(lambda: all_ready(server), RESTART_TIMEOUT_S, "both instances ready")
    failures = counter(server, "instance_failures")
    runs = streams_on(server, 2)
    victim = running_on(server, runs[0].request_id, MODEL)
    pid = engine_pid(server, victim, MODEL)
    os.kill(pid, signal.SIGSTOP)  # the server stops it for good (SIGKILL works on a stopped process)
    try:
        assert_whole(runs, baseline)
        state = instances(server, MODEL)[victim]
        assert state["state"] in ("failed", "starting", "ready")
        assert counter(server, "instance_failures") > failures
        wait_until(lambda: all_ready(server), RESTART_TIMEOUT_S, f"instance {victim} restarted")
        assert engine_pid(server, victim, MODEL) != pid
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
