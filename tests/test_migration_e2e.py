"""Live migration between two real vLLM CPU instances of `alpha`, driven over HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from llumnix_server.launcher import ServerProcess

pytestmark = pytest.mark.engine

PROMPT = "Migration moves a running request between instances without stopping it. " * 4
# Long enough that the request is still decoding (seconds) when the test acts on it.
MAX_TOKENS = 2000


class StreamedCompletion:
    """A streaming completion read on a thread, so the test can act while it runs."""

    def __init__(self, server: ServerProcess, **overrides) -> None:
        self.body = {"model": "alpha", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                     "ignore_eos": True, "stream": True, "return_token_ids": True, **overrides}
        self.server = server
        self.request_id: str | None = None
        self.token_ids: list[int] = []
        self.chunks: list[list[int]] = []
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with httpx.Client(base_url=self.server.url, headers=self.server.headers, timeout=120) as client:
                with client.stream("POST", "/v1/completions", json=self.body) as response:
                    assert response.status_code == 200, response.read()
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        with self._progress:
                            self.request_id = event["id"]
                            for choice in event["choices"]:
                                self.chunks.append(choice["token_ids"])
                                self.token_ids += choice["token_ids"]
                                self.text.append(choice["text"])
                                self.finish_reason = choice["finish_reason"] or self.finish_reason
                            self._progress.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc
        finally:
            with self._progress:
                self._progress.notify_all()

    def wait_for_tokens(self, n: int, timeout: float = 30) -> None:
        with self._progress:
            assert self._progress.wait_for(lambda: len(self.token_ids) >= n or not self._thread.is_alive(), timeout)
        assert len(self.token_ids) >= n, f"the request ended after {len(self.token_ids)} tokens"

    def result(self) -> StreamedCompletion:
        self._thread.join(120)
        if self.error is not None:
            raise self.error
        return self


def running_on(server: ServerProcess, request_id: str) -> str:
    instances = httpx.get(server.url + "/v2/llumnix/models/alpha/instances", headers=server.headers).json()
    found = [i["id"] for i in instances["instances"] if request_id in [r["request_id"] for r in i["snapshot"]["running"]]]
    assert len(found) == 1, json.dumps(instances)[:3000]
    return found[0]


def migrate(server: ServerProcess, request_id: str, to: str) -> httpx.Response:
    return httpx.post(server.url + "/v2/llumnix/models/alpha/migrate", headers=server.headers, timeout=60,
                      json={"request_id": request_id, "to": to})


def other(instance: str) -> str:
    return {"0": "1", "1": "0"}[instance]


def blocks_in_use(server: ServerProcess) -> dict[str, int]:
    instances = httpx.get(server.url + "/v2/llumnix/models/alpha/instances", headers=server.headers).json()
    return {i["id"]: i["snapshot"]["used_blocks"] for i in instances["instances"]}


def wait_idle(server: ServerProcess, timeout: float = 10) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while (used := blocks_in_use(server)) != {"0": 0, "1": 0} and time.monotonic() < deadline:
        time.sleep(0.05)
    return used


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
    assert run.token_ids == baseline.token_ids
    assert wait_idle(serving) == {"0": 0, "1": 0}


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
    placement = {run.request_id: running_on(serving, run.request_id) for run in runs}
    drained = max(set(placement.values()), key=list(placement.values()).count)
    assert list(placement.values()).count(drained) >= 3, placement  # the dispatcher put several there
    url = f"{serving.url}/v2/llumnix/models/alpha/instances/{drained}"
    response = httpx.post(url + "/drain", headers=serving.headers)
    assert response.status_code == 200, response.text
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = {i["id"]: i for i in httpx.get(serving.url + "/v2/llumnix/models/alpha/instances",
                                                     headers=serving.headers).json()["instances"]}
            if not listed[drained]["snapshot"]["running"]:
                break
            time.sleep(0.05)
        assert listed[drained]["state"] == "draining"
        assert not listed[drained]["snapshot"]["running"], listed[drained]
        # None failed: every request ends whole and exactly as it would have anyway.
        for run in runs:
            assert run.result().token_ids == baseline.token_ids
        # New requests avoid the draining instance.
        late = StreamedCompletion(serving, max_tokens=300)
        late.wait_for_tokens(5)
        assert running_on(serving, late.request_id) != drained
        late.result()
    finally:
        assert httpx.post(url + "/resume", headers=serving.headers).status_code == 200
    assert wait_idle(serving) == {"0": 0, "1": 0}
    metrics = httpx.get(serving.url + "/metrics").text
    assert f'llumnix:migrations_committed_total{{destination="{other(drained)}",model_name="alpha",source="{drained}"}}' in metrics
    assert "llumnix:migration_downtime_seconds_bucket" in metrics
