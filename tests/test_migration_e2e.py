"""Live migration between two real vLLM CPU instances of `alpha`, driven over HTTP."""

from __future__ import annotations

import time

import httpx
import pytest

from llumnix_client import (
    MAX_TOKENS,
    InBackground,
    StreamedCompletion,
    engine_pid,
    frozen,
    instances,
    migrate,
    other,
    running_on,
    set_draining,
    wait_idle,
)
from llumnix_server.launcher import ServerProcess

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def baseline(serving: ServerProcess) -> StreamedCompletion:
    """The request, run without migration: what every migrated run must reproduce."""
    return StreamedCompletion(serving).result()


def test_a_migrated_request_produces_exactly_the_same_tokens(serving, baseline) -> None:
    run = StreamedCompletion(serving)
    run.wait_for_tokens(60)
    source = running_on(serving, run.request_id)
    response = migrate(serving, run.request_id, other(source))
    assert response.status_code == 200, response.text
    report = response.json()
    run.result()
    assert report["committed"], report
    assert report["source"] == source and report["destination"] == other(source)
    assert report["stages"] >= 1 and report["blocks"] >= 2 and report["bytes"] > 0
    # Read from the destination engine: every prompt token but the last came with the request.
    assert report["recomputed_tokens"] == 1
    assert 0 < report["downtime_s"] < report["duration_s"]
    # One gap-free, duplicate-free stream: the same tokens and text as without migration.
    assert run.token_ids == baseline.token_ids
    assert "".join(run.text) == "".join(baseline.text)
    assert run.finish_reason == "length" and len(run.token_ids) == MAX_TOKENS
    assert wait_idle(serving) == {"0": 0, "1": 0}


def test_migrating_back_and_forth(serving, baseline) -> None:
    run = StreamedCompletion(serving)
    reports = []
    for tokens_read in (40, 150, 260, 370):
        run.wait_for_tokens(tokens_read)
        source = running_on(serving, run.request_id)
        response = migrate(serving, run.request_id, other(source))
        assert response.status_code == 200, response.text
        reports.append(response.json())
    run.result()
    assert [r["committed"] for r in reports] == [True] * 4, reports
    assert [r["destination"] for r in reports[1:]] == [r["source"] for r in reports[:-1]]
    assert all(r["recomputed_tokens"] == 1 for r in reports), reports
    # The later moves copied 5 blocks and more, 2 per source step: stages went in chunks.
    assert reports[-1]["copies"] > reports[-1]["stages"] + 1, reports[-1]
    assert run.token_ids == baseline.token_ids
    assert "".join(run.text) == "".join(baseline.text)
    assert wait_idle(serving) == {"0": 0, "1": 0}


def test_text_across_many_switches_is_the_undisturbed_text(serving) -> None:
    # The tiny model's byte-level tokens often split a UTF-8 character, and its random weights
    # emit invalid UTF-8 too; a switch must not lose or garble any of it.
    body = {"prompt": "The quick brown fox", "max_tokens": 1800}
    undisturbed = StreamedCompletion(serving, **body).result()
    run = StreamedCompletion(serving, **body)
    committed = 0
    for tokens_read in range(60, 1700, 110):
        run.wait_for_tokens(tokens_read)
        response = migrate(serving, run.request_id, other(running_on(serving, run.request_id)))
        committed += response.status_code == 200 and response.json()["committed"]
    run.result()
    assert committed >= 10
    assert run.token_ids == undisturbed.token_ids
    assert "".join(run.text) == "".join(undisturbed.text)


def test_migration_requests_that_cannot_start_get_a_clear_4xx(serving) -> None:
    run = StreamedCompletion(serving)
    run.wait_for_tokens(20)
    source = running_on(serving, run.request_id)
    cases = [
        ({"request_id": "cmpl-nope", "to": other(source)}, 404, "no running request 'cmpl-nope'"),
        ({"request_id": run.request_id, "to": source}, 400, "already runs on instance"),
        ({"request_id": run.request_id, "to": "7"}, 404, "no instance '7'"),
        ({"request_id": run.request_id}, 400, "to: Field required"),
    ]
    for body, status, words in cases:
        response = httpx.post(serving.url + "/v2/llumnix/models/alpha/migrate", headers=serving.headers, json=body)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"], response.text
    unknown_model = httpx.post(serving.url + "/v2/llumnix/models/nope/migrate", headers=serving.headers,
                               json={"request_id": run.request_id, "to": "1"})
    assert unknown_model.status_code == 404
    # Nothing was moved: the request finished where it was, whole.
    assert running_on(serving, run.request_id) == source
    assert len(run.result().token_ids) == MAX_TOKENS


def test_a_request_sharing_prefix_blocks_migrates_and_leaves_the_others_intact(serving, baseline) -> None:
    """Two requests with the same prompt share its full KV blocks on one instance (prefix
    caching). Moving one away copies the shared blocks and leaves them with the other."""
    first = StreamedCompletion(serving)
    first.wait_for_tokens(5)
    source = running_on(serving, first.request_id)
    # Steer the twin onto the same instance (the dispatcher would balance it away).
    second = StreamedCompletion(serving)
    second.wait_for_tokens(5)
    if running_on(serving, second.request_id) != source:
        assert migrate(serving, second.request_id, source).json()["committed"]
    first.wait_for_tokens(80)
    report = migrate(serving, first.request_id, other(source)).json()
    assert report["committed"], report
    assert first.result().token_ids == baseline.token_ids
    assert second.result().token_ids == baseline.token_ids
    assert wait_idle(serving) == {"0": 0, "1": 0}


def test_draining_an_instance_under_load_moves_all_its_requests(serving, baseline) -> None:
    runs = [StreamedCompletion(serving) for _ in range(6)]
    for run in runs:
        run.wait_for_tokens(10)
    placement = [running_on(serving, run.request_id) for run in runs]
    drained = max(set(placement), key=placement.count)
    assert placement.count(drained) >= 3, placement  # the dispatcher put several there
    set_draining(serving, drained, True)
    try:
        deadline = time.monotonic() + 60
        while instances(serving)[drained]["snapshot"]["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        listed = instances(serving)[drained]
        assert listed["state"] == "draining"
        assert not listed["snapshot"]["running"], listed
        # None failed: every request ends whole and exactly as it would have anyway.
        for run in runs:
            assert run.result().token_ids == baseline.token_ids
        # New requests avoid the draining instance.
        late = StreamedCompletion(serving, max_tokens=300).wait_for_tokens(5)
        assert running_on(serving, late.request_id) != drained
        late.result()
    finally:
        set_draining(serving, drained, False)
    assert wait_idle(serving) == {"0": 0, "1": 0}
    metrics = httpx.get(serving.url + "/metrics").text
    assert f'llumnix:migrations_committed_total{{destination="{other(drained)}",model_name="alpha",source="{drained}"}}' in metrics
    assert "llumnix:migration_downtime_seconds_bucket" in metrics


# --- abort rules: a failure before the switch leaves the request where it was ------------------
# `alpha` gives up on a migration stage after 3 s (conftest); the destination engine is frozen
# with SIGSTOP to make it stop answering at a chosen moment.


def test_a_destination_that_stops_answering_aborts_the_migration(serving, baseline) -> None:
    run = StreamedCompletion(serving).wait_for_tokens(20)
    source = running_on(serving, run.request_id)
    with frozen(engine_pid(serving, other(source))):
        generated = len(run.token_ids)
        response = migrate(serving, run.request_id, other(source))
        # The source kept decoding meanwhile (the request may even have finished there).
        assert len(run.token_ids) > generated
    assert response.status_code == 200, response.text
    report = response.json()
    assert not report["committed"] and report["reason"] == "a stage timed out", report
    assert run.result().token_ids == baseline.token_ids
    # The destination's half-done work was given up once it answered again: nothing leaks.
    assert wait_idle(serving) == {"0": 0, "1": 0}


def test_a_request_that_finishes_during_its_migration_completes_on_its_source(serving, baseline) -> None:
    run = StreamedCompletion(serving, max_tokens=300).wait_for_tokens(20)
    source = running_on(serving, run.request_id)
    with frozen(engine_pid(serving, other(source))):
        migrating = InBackground(lambda: migrate(serving, run.request_id, other(source)))
        run.result()  # the request ends on the source while its destination is stuck
    report = migrating.result().json()
    # Seen by the relay (it ended the stream) or by the next copy (nothing left to copy).
    finished = ("the request finished on the source",
                "the request is not decoding on the source: the engine does not run it")
    assert not report["committed"] and report["reason"].startswith(finished), report
    assert run.token_ids == baseline.token_ids[:300] and run.finish_reason == "length"
    assert wait_idle(serving) == {"0": 0, "1": 0}


def test_a_migrated_request_keeps_its_logprobs(serving) -> None:
    body = {"max_tokens": 400, "logprobs": 2}
    undisturbed = StreamedCompletion(serving, **body).result()
    run = StreamedCompletion(serving, **body).wait_for_tokens(100)
    response = migrate(serving, run.request_id, other(running_on(serving, run.request_id)))
    assert response.status_code == 200 and response.json()["committed"], response.text
    run.result()
    assert run.token_ids == undisturbed.token_ids
    # One logprob per token, before and after the switch, as the undisturbed run's (the
    # destination computes them from the KV it was handed).
    assert len(run.logprobs) == len(undisturbed.logprobs) == 400
    assert run.logprobs == pytest.approx(undisturbed.logprobs, abs=1e-3)


def test_a_seeded_sampled_request_is_not_moved_and_the_refusal_says_why(serving) -> None:
    run = StreamedCompletion(serving, max_tokens=600, temperature=1.0, seed=7).wait_for_tokens(20)
    source = running_on(serving, run.request_id)
    response = migrate(serving, run.request_id, other(source))
    assert response.status_code == 409 and "seeded random sampling lives in its engine" in response.text, \
        response.text
    run.result()
    assert len(run.token_ids) == 600 and run.finish_reason == "length"
    # The same seed on an undisturbed run gives the same tokens: nothing was disturbed.
    assert StreamedCompletion(serving, max_tokens=600, temperature=1.0, seed=7).result().token_ids == run.token_ids
