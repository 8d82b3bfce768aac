"""Llumnix rescheduling on real vLLM CPU instances: each trigger of the migration policy, set up
deliberately, causes the migrations it should and none it should not.

`gamma` runs two instances of 63 KV blocks each (128 tokens a block) with rescheduling on:
instances with fewer than 10 free blocks (1,280 tokens) per request send requests to instances
with more than 30 (3,840 tokens), one migration at a time per instance. Setups steer requests onto instance 0 by draining instance 1 while they arrive, then
let the policy act by resuming it. The arithmetic in each test follows `migration_freeness`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ready_server, tiny_config, write_model
from llumnix_client import (
    InBackground,
    StreamedCompletion,
    engine_pid,
    frozen,
    instances,
    migrate,
    migrations,
    other,
    running_on,
    set_draining,
    wait_idle,
)
from llumnix_server.launcher import ServerProcess

pytestmark = pytest.mark.engine

MODEL = "gamma"
BLOCK_SIZE = 128
TOTAL_BLOCKS = 63
# How long the policy gets to act (it looks every 0.1 s), and then to prove it is done.
ACT_WITHIN_S = 10
SETTLE_S = 1.5


@pytest.fixture(scope="module")
def gamma_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rescheduling-repository")


@pytest.fixture(scope="module")
def gamma(gamma_repository: Path, tiny_model: Path) -> ServerProcess:
    repository = gamma_repository
    config = tiny_config(str(tiny_model), instances=2, max_model_len=TOTAL_BLOCKS * BLOCK_SIZE)
    # A whole long prompt is prefilled in one step: a request that does not fit waits whole.
    config["engine"]["max_num_batched_tokens"] = TOTAL_BLOCKS * BLOCK_SIZE
    config["resources"]["cpu_kv_cache_gib"] = (TOTAL_BLOCKS + 1) * 512 / 2**20  # float32 KV: 512 KiB a block
    config["scheduler"]["priority"] = {"high_below": 0, "headroom_tokens": 32 * BLOCK_SIZE}
    # Tests freeze a destination for a few seconds on purpose; a stage gives up after 10.
    config["scheduler"]["migration"] = {"source_below_tokens": 10 * BLOCK_SIZE, "destination_above_tokens": 30 * BLOCK_SIZE,
                                        "max_in_flight_per_instance": 1, "stage_timeout_s": 10}
    write_model(repository, MODEL, config)
    with ready_server(repository, "rescheduling-server.log", [MODEL, MODEL]) as server:
        assert [i["snapshot"]["total_blocks"] for i in instances(server, MODEL).values()] == [TOTAL_BLOCKS] * 2
        yield server


def prompt(num_tokens: int, salt: int) -> list[int]:
    """Token ids that share no prefix with any other test's (the prefix cache stays out of it)."""
    return [3 + (salt * 7919 + i * 31) % 250 for i in range(num_tokens)]


def start_on_instance_0(server: ServerProcess, requests: list[dict]) -> list[StreamedCompletion]:
    """Start requests while instance 1 is draining, so they all run on instance 0. All at once:
    one after another, on a slow machine the first could be nearly done (500 tokens) before the
    last began, and the load the tests count on would not last."""
    set_draining(server, "1", True, MODEL)
    try:
        runs = [StreamedCompletion(server, MODEL, **body) for body in requests]
        for run in runs:
            run.wait_for_tokens(2)
        assert {running_on(server, run.request_id, MODEL) for run in runs} == {"0"}
    finally:
        set_draining(server, "1", False, MODEL)
    return runs


def migrations_since(server: ServerProcess, before: dict) -> dict:
    now = migrations(server, MODEL)
    return {pair: n - before.get(pair, 0) for pair, n in now.items() if n > before.get(pair, 0)}


def wait_for_migrations(server: ServerProcess, before: dict, expected: dict) -> dict:
    """Committed migrations since `before`, once they reach `expected` or ACT_WITHIN_S passed."""
    deadline = time.monotonic() + ACT_WITHIN_S
    while (moved := migrations_since(server, before)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return moved


def placement(server: ServerProcess, runs: list[StreamedCompletion]) -> list[str]:
    return [running_on(server, run.request_id, MODEL) for run in runs]


def finish(server: ServerProcess, runs: list[StreamedCompletion]) -> None:
    """Every request ends whole, and no KV block is left in use anywhere."""
    for run in runs:
        run.result()
        assert run.finish_reason == "length" and len(run.token_ids) == run.body["max_tokens"]
    assert wait_idle(server, MODEL) == {"0": 0, "1": 0}


def short_request(salt: int, **overrides) -> dict:
    """8 blocks at first (7 full and one token), at most 11 by the end (1,397 tokens)."""
    return {"prompt": prompt(7 * BLOCK_SIZE + 1, salt), "max_tokens": 500, **overrides}


def test_balanced_load_causes_no_migration(gamma) -> None:
    # Two on instance 0: at least (63 - 2 * 11) / 2 = 20.5 free blocks per request, never < 10.
    before = migrations(gamma, MODEL)
    runs = start_on_instance_0(gamma, [short_request(1), short_request(2)])
    time.sleep(SETTLE_S)
    assert migrations_since(gamma, before) == {}
    finish(gamma, runs)


def test_load_imbalance_moves_one_request_to_the_idle_instance(gamma) -> None:
    # Four on instance 0: (63 - 4 * 8) / 4 = 7.75 < 10, and instance 1 is idle (63 > 30). Once
    # one has moved, at least (63 - 3 * 11) / 3 = 10 is left: nothing more moves.
    before = migrations(gamma, MODEL)
    runs = start_on_instance_0(gamma, [short_request(s) for s in (3, 4, 5, 6)])
    moved = wait_for_migrations(gamma, before, {("0", "1"): 1})
    tried = {outcome: migrations(gamma, MODEL, outcome) for outcome in ("started", "aborted")}
    assert moved == {("0", "1"): 1}, (moved, tried, {i: s["snapshot"] for i, s in instances(gamma, MODEL).items()})
    assert sorted(placement(gamma, runs)) == ["0", "0", "0", "1"]
    time.sleep(SETTLE_S)
    assert migrations_since(gamma, before) == {("0", "1"): 1}
    finish(gamma, runs)


def test_priority_headroom_sends_low_priority_work_away(gamma) -> None:
    # A high-priority request keeps 32 blocks of headroom free: (63 - 2 * 8 - 32) / 2 = 7.5 < 10
    # on instance 0, so the low-priority request leaves; the high-priority one stays. (Two
    # low-priority requests there are the balanced case above: nothing moves.)
    before = migrations(gamma, MODEL)
    runs = start_on_instance_0(gamma, [short_request(7, priority=-5), short_request(8, priority=5)])
    assert wait_for_migrations(gamma, before, {("0", "1"): 1}) == {("0", "1"): 1}
    assert placement(gamma, runs) == ["0", "1"]
    time.sleep(SETTLE_S)
    assert migrations_since(gamma, before) == {("0", "1"): 1}
    finish(gamma, runs)


def test_defragmentation_makes_room_for_a_request_that_fits_nowhere(gamma) -> None:
    # One 16-block request per instance (the dispatcher balances them), at most 20 by the end:
    # 47 blocks free on each. A 48-block prompt fits on neither and waits; its instance's
    # freeness is negative, so the request running there moves to the other instance (which then
    # holds at most 40 blocks), and the big one gets the 63 blocks of the instance it waits on.
    before = migrations(gamma, MODEL)
    small = [StreamedCompletion(gamma, MODEL, prompt=prompt(2000, s), max_tokens=500).wait_for_tokens(2)
             for s in (9, 10)]
    assert sorted(placement(gamma, small)) == ["0", "1"]
    big = StreamedCompletion(gamma, MODEL, prompt=prompt(48 * BLOCK_SIZE - 10, 11), max_tokens=5).result()
    assert big.finish_reason == "length" and len(big.token_ids) == 5
    moved = migrations_since(gamma, before)
    assert sum(moved.values()) == 1, moved
    finish(gamma, small)


def test_a_full_destination_is_refused_and_nothing_moves(gamma) -> None:
    # A 57-block request on instance 1 leaves it 6 blocks; an 8-block request cannot go there.
    # (Nor can the policy move the big one: it needs 58 blocks, instance 0 has 55 free.)
    set_draining(gamma, "0", True, MODEL)
    try:
        big = StreamedCompletion(gamma, MODEL, prompt=prompt(57 * BLOCK_SIZE - 10, 14), max_tokens=300)
        big.wait_for_tokens(2)
    finally:
        set_draining(gamma, "0", False, MODEL)
    small = StreamedCompletion(gamma, MODEL, **short_request(15)).wait_for_tokens(2)
    assert placement(gamma, [big, small]) == ["1", "0"]
    before = migrations(gamma, MODEL, "started")
    response = migrate(gamma, small.request_id, "1", MODEL)
    assert response.status_code == 400, response.text
    assert "instance '1' has no room" in response.json()["error"], response.text
    assert migrations(gamma, MODEL, "started") == before
    assert running_on(gamma, small.request_id, MODEL) == "0"
    finish(gamma, [big, small])


def test_a_request_preempted_during_its_migration_stays_and_completes_on_its_source(gamma) -> None:
    # The destination is frozen, so the migration waits in its first stage. Meanwhile a
    # high-priority 48-block request joins the low-priority one on instance 0: admitted while
    # the low-priority one holds at most 15 blocks (its first ~1,000 tokens), the two then grow
    # past the 63 blocks (to 60 and 24 at most) and vLLM preempts the low-priority one, which
    # waits until the high-priority one is done. When the destination answers again, the
    # migration finds its request no longer decoding and stops.
    (low,) = start_on_instance_0(gamma, [short_request(16, priority=5, max_tokens=2000)])
    started = migrations(gamma, MODEL, "started").get(("0", "1"), 0)
    with frozen(engine_pid(gamma, "1", MODEL)):
        migrating = InBackground(lambda: migrate(gamma, low.request_id, "1", MODEL))
        deadline = time.monotonic() + 10
        while migrations(gamma, MODEL, "started").get(("0", "1"), 0) == started and time.monotonic() < deadline:
            time.sleep(0.02)
        # The migration is under way; the high-priority request must go to instance 0.
        set_draining(gamma, "1", True, MODEL)
        try:
            high = StreamedCompletion(gamma, MODEL, prompt=prompt(48 * BLOCK_SIZE - 10, 17), max_tokens=1500,
                                      priority=-5)
            deadline = time.monotonic() + 20
            while low.request_id not in waiting_on(gamma, "0") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert low.request_id in waiting_on(gamma, "0"), "the low-priority request was not preempted"
        finally:
            set_draining(gamma, "1", False, MODEL)
    report = migrating.result().json()
    # (why, as the engine saw it: queued again, or left out of the step that preempted it)
    assert not report["committed"] and report["reason"].startswith("the request is not decoding on the source: "), report
    # Both complete on instance 0, the preempted one after recomputing its KV there.
    finish(gamma, [high, low])


def waiting_on(server: ServerProcess, instance: str) -> list[str]:
    return [r["request_id"] for r in instances(server, MODEL)[instance]["snapshot"]["waiting"]]


def preemptions(server: ServerProcess) -> int:
    return sum(i["snapshot"]["num_preemptions"] for i in instances(server, MODEL).values())


def apply_scheduler(server: ServerProcess, repository: Path, dispatch: str, rescheduling: bool) -> None:
    """Edit gamma's scheduler section in its folder and wait for the server to apply it live."""
    config_file = repository / MODEL / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["scheduler"]["dispatch_policy"] = dispatch
    config["scheduler"]["migration"]["rescheduling"] = rescheduling
    config_file.write_text(yaml.safe_dump(config))
    deadline = time.monotonic() + 20
    while True:
        listing = httpx.get(f"{server.url}/v2/llumnix/models/{MODEL}/instances").json()
        if (listing["dispatch_policy"], listing["rescheduling"]["active"]) == (dispatch, rescheduling):
            return
        assert time.monotonic() < deadline, f"the scheduler change was not applied: {listing}"
        time.sleep(0.1)


def skewed_load(server: ServerProcess, salt: int) -> tuple[list[StreamedCompletion], int, dict]:
    """Round robin with big and small requests alternating puts all four big ones on one
    instance: 4 x 12 blocks at first, 4 x 18 by the end, on 63 blocks, so that instance must
    preempt unless work moves; the small ones leave the other instance idle. Returns the runs
    (all finished whole), the preemptions they caused and the migrations committed meanwhile."""
    before_preemptions, before_migrations = preemptions(server), migrations(server, MODEL)
    runs = []
    for i in range(8):
        big = i % 2 == 0
        body = {"prompt": prompt(1500 if big else 100, salt + i), "max_tokens": 800 if big else 20}
        runs.append(StreamedCompletion(server, MODEL, **body).wait_for_tokens(1))
    for run in runs:
        run.result()
        assert run.finish_reason == "length" and len(run.token_ids) == run.body["max_tokens"]
    assert wait_idle(server, MODEL) == {"0": 0, "1": 0}
    return runs, preemptions(server) - before_preemptions, migrations_since(server, before_migrations)


def test_rescheduling_saves_the_preemptions_of_a_skewed_load(gamma, gamma_repository) -> None:
    """The same skewed load, without and then with rescheduling: without, the crowded instance
    preempts; with it, requests migrate to the idle instance and fewer preemptions happen."""
    try:
        apply_scheduler(gamma, gamma_repository, "round_robin", rescheduling=False)
        _, preempted_without, moved_without = skewed_load(gamma, 100)
        apply_scheduler(gamma, gamma_repository, "round_robin", rescheduling=True)
        _, preempted_with, moved_with = skewed_load(gamma, 200)
    finally:
        apply_scheduler(gamma, gamma_repository, "llumnix", rescheduling=True)
    assert moved_without == {} and preempted_without > 0
    assert sum(moved_with.values()) >= 1
    assert preempted_with < preempted_without, (preempted_with, preempted_without)


# Last: it kills one of gamma's instances.
def test_a_destination_that_dies_mid_migration_leaves_the_request_on_its_source(gamma) -> None:
    # Long enough to outlast the migration's abort on a fast machine (about 2 ms a token).
    run = StreamedCompletion(gamma, MODEL, prompt=prompt(300, 12), max_tokens=4000).wait_for_tokens(20)
    source = running_on(gamma, run.request_id, MODEL)
    doomed = engine_pid(gamma, other(source), MODEL)
    with frozen(doomed):
        migrating = InBackground(lambda: migrate(gamma, run.request_id, other(source), MODEL))
        time.sleep(0.5)  # the migration is now waiting on the frozen destination
        os.kill(doomed, signal.SIGKILL)
    report = migrating.result().json()
    assert not report["committed"], report
    assert running_on(gamma, run.request_id, MODEL) == source
    run.result()
    assert run.finish_reason == "length" and len(run.token_ids) == 4000
    # Lost and restarted (the control loop's backoff is 1 s; the restart may be done by now).
    dead = instances(gamma, MODEL)[other(source)]
    if dead["state"] == "ready":
        assert dead["snapshot"]["engine_pid"] != doomed, dead
    else:
        assert dead["state"] in ("failed", "starting") and "SIGKILL" in dead["error"], dead
    series = f'llumnix:instance_failures_total{{engine="{other(source)}",model_name="{MODEL}"}} '
    (line,) = [x for x in httpx.get(gamma.url + "/metrics", timeout=30).text.splitlines() if x.startswith(series)]
    assert float(line.removeprefix(series)) >= 1
    deadline = time.monotonic() + 10
    while instances(gamma, MODEL)[source]["snapshot"]["used_blocks"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instances(gamma, MODEL)[source]["snapshot"]["used_blocks"] == 0
    # The model keeps serving on the instance that is left.
    after = StreamedCompletion(gamma, MODEL, prompt=prompt(100, 13), max_tokens=10).result()
    assert len(after.token_ids) == 10
