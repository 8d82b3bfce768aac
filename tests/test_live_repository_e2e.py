"""A server in the default control mode (poll) follows its repository folder: a dropped folder
is served without a restart, config edits are applied (or refused, the old version serving),
and a removed folder is unloaded once its requests end. Real vLLM CPU instances."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import yaml

from conftest import ENGINE_START_TIMEOUT_S, tiny_config, write_model
from llumnix_client import (
    BoundedLoad,
    StreamedCompletion,
    instances,
    migrations,
    running_on,
    set_draining,
    short_generation,
)
from llumnix_server.launcher import ServerProcess, llumnix_server, wait_for_repository

pytestmark = pytest.mark.engine


class LiveServer(NamedTuple):
    server: ServerProcess
    repository: Path  # the tests edit it while the server runs


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> LiveServer:
    repository = tmp_path_factory.mktemp("live-repository")
    write_model(repository, "base", tiny_config(str(tiny_model), max_model_len=2048))
    server = llumnix_server(repository, repository.parent / "live-server.log").start()
    try:
        wait_for_repository(server, ENGINE_START_TIMEOUT_S)
        yield LiveServer(server, repository)
    finally:
        server.stop()


def index(server: ServerProcess) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.post(f"{server.url}/v2/repository/index").json()}


def _listing(server: ServerProcess, model: str) -> dict:
    return httpx.get(f"{server.url}/v2/llumnix/models/{model}/instances", headers=server.headers).json()


def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_a_dropped_folder_serves_edits_apply_under_load_and_removal_unloads(live, tiny_model, tmp_path) -> None:
    server, repository = live
    # Drop a folder in (prepared elsewhere, then moved in, as `cp -r` then `mv` would).
    config = tiny_config(str(tiny_model), max_model_len=4096)
    staging = write_model(tmp_path, "dropped", config)
    shutil.move(staging, repository / "dropped")
    eventually(lambda: short_generation(server, "dropped").status_code == 200, ENGINE_START_TIMEOUT_S,
               "dropped model serves")
    assert index(server)["dropped"]["state"] == "READY"
    engine = instances(server, "dropped")["0"]["snapshot"]["engine_pid"]
    config_file = repository / "dropped" / "config.yaml"
    listing = lambda: httpx.get(f"{server.url}/v2/llumnix/models/dropped/instances").json()  # noqa: E731
    states = lambda: {i: s["state"] for i, s in instances(server, "dropped").items()}  # noqa: E731
    # Every change below is made while streaming requests run, two at a time (of 3,000 tokens, so
    # that a switch of engines finds them mid-decode even on a busy machine:
    # the 200 the load sends must last until its last step, two engine starts away).
    load = BoundedLoad(server, "dropped", concurrency=2, max_tokens=3000)

    # A scheduler change, and a chat template of the folder's own: applied in place, nothing restarted.
    config["scheduler"]["dispatch_policy"] = "queue"
    config["scheduler"]["migration"] = {"source_below_tokens": 256, "destination_above_tokens": 1024}
    config["frontend"] = {"chat_template": "chat.jinja", "limits": {"max_stop_strings": 2}}
    (repository / "dropped" / "chat.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    config_file.write_text(yaml.safe_dump(config))
    eventually(lambda: listing()["dispatch_policy"] == "queue", 20, "the new dispatch policy")
    assert instances(server, "dropped")["0"]["snapshot"]["engine_pid"] == engine
    rendered = httpx.post(f"{server.url}/tokenize", json={"model": "dropped", "messages": [{"role": "user", "content": "hi"}]})
    plain = httpx.post(f"{server.url}/tokenize", json={"model": "dropped", "prompt": "[hi]", "add_special_tokens": False})
    assert rendered.json()["tokens"] == plain.json()["tokens"], (rendered.text, plain.text)
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": "dropped", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == plain.json()["count"], chat.text
    three_stops = httpx.post(f"{server.url}/v1/completions", timeout=60,
                             json={"model": "dropped", "prompt": "hi", "max_tokens": 1, "stop": ["a", "b", "c"]})
    assert three_stops.status_code == 400 and "frontend.limits.max_stop_strings" in three_stops.text, three_stops.text
    # Rescheduling is on in the config, but with one instance there is nothing to pair.
    assert listing()["rescheduling"] == {"enabled": True, "active": False, "interval_s": 0.1, "source_below_tokens": 256,
                                         "destination_above_tokens": 1024, "max_in_flight_per_instance": 2}

    # More instances, then fewer: instance 0 runs throughout; the surplus one is drained (its
    # requests migrate to instance 0) and stopped.
    config["instances"] = 2
    config_file.write_text(yaml.safe_dump(config))
    eventually(lambda: states() == {"0": "ready", "1": "ready"}, ENGINE_START_TIMEOUT_S, "a second instance")
    eventually(lambda: listing()["rescheduling"]["active"] is True, 5, "rescheduling between the two")
    eventually(lambda: instances(server, "dropped")["1"]["snapshot"]["running"], 60, "requests on instance 1")
    config["instances"] = 1
    config_file.write_text(yaml.safe_dump(config))
    eventually(lambda: states() == {"0": "ready"}, 60, "back to one instance")
    assert instances(server, "dropped")["0"]["snapshot"]["engine_pid"] == engine

    # An engine argument: new engines start beside the old one; its requests migrate to them
    # (same KV layout), then it stops.
    migrated_before = sum(migrations(server, "dropped").values())
    config["engine"]["max_num_seqs"] = 8
    config_file.write_text(yaml.safe_dump(config))
    eventually(lambda: states() == {"2": "ready"}, ENGINE_START_TIMEOUT_S, "the new engine alone")
    assert instances(server, "dropped")["2"]["snapshot"]["engine_pid"] != engine
    assert sum(migrations(server, "dropped").values()) > migrated_before, \
        {outcome: migrations(server, "dropped", outcome) for outcome in ("started", "aborted")}

    # An invalid edit: refused with the file and the field; the model keeps serving.
    config_file.write_text(yaml.safe_dump({**config, "colour": "red"}))
    eventually(lambda: "colour: unknown key" in index(server)["dropped"]["reason"], 20, "the error in the index")
    assert str(config_file) in index(server)["dropped"]["reason"]
    assert index(server)["dropped"]["state"] == "READY" and short_generation(server, "dropped").status_code == 200
    # Fixed again: the error goes, and nothing restarts (the config is what serves).
    config_file.write_text(yaml.safe_dump(config))
    eventually(lambda: index(server)["dropped"]["reason"] == "", 20, "the error cleared")

    runs = load.stop()
    assert len(runs) >= 4
    for run in runs:
        assert run.error is None and run.finish_reason == "length" and len(run.token_ids) == 3000, run.error
    # The final state is the folder's: one instance of the new engine, the queue dispatcher.
    assert states() == {"2": "ready"} and listing()["dispatch_policy"] == "queue"

    # Removed while a request runs: the request ends whole, then the model is gone.
    running = StreamedCompletion(server, "dropped", max_tokens=300).wait_for_tokens(5)
    shutil.rmtree(repository / "dropped")
    assert len(running.result().token_ids) == 300
    eventually(lambda: "dropped" not in index(server), 30, "the model unloaded")
    assert short_generation(server, "dropped").status_code == 404
    # The other model never noticed.
    assert short_generation(server, "base").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    for series in ('llumnix:model_operations_total{model_name="dropped",operation="load",outcome="success"} 1.0',
                   'llumnix:model_operations_total{model_name="dropped",operation="reload",outcome="success"} 4.0',
                   'llumnix:model_operations_total{model_name="dropped",operation="reload",outcome="failure"} 1.0',
                   'llumnix:model_operations_total{model_name="dropped",operation="unload",outcome="success"} 1.0'):
        assert series in metrics, series


def test_an_engine_that_fails_to_start_is_retried_on_the_next_change(live, tiny_model) -> None:
    server, repository = live
    config = tiny_config(str(tiny_model), max_model_len=2048)
    config["resources"]["cpu_kv_cache_gib"] = 0.001  # too little for one 2048-token sequence
    write_model(repository, "starved", config)
    eventually(lambda: index(server).get("starved", {}).get("state") == "UNAVAILABLE", ENGINE_START_TIMEOUT_S,
               "the failed start reported")
    reason = index(server)["starved"]["reason"]
    # The engine's own error, not only vLLM's "see root cause above".
    assert "no instance started (instance 0: ValueError: To serve at least one request" in reason, reason
    assert short_generation(server, "base").status_code == 200  # other models never notice
    config["resources"]["cpu_kv_cache_gib"] = 0.25
    (repository / "starved" / "config.yaml").write_text(yaml.safe_dump(config))
    eventually(lambda: short_generation(server, "starved").status_code == 200, ENGINE_START_TIMEOUT_S,
               "the model serves after the fix")
    assert index(server)["starved"] == {"name": "starved", "version": "1", "state": "READY", "reason": ""}
    shutil.rmtree(repository / "starved")


def test_a_model_at_its_queue_bound_answers_503_with_retry_after(live, tiny_model) -> None:
    server, repository = live
    config = tiny_config(str(tiny_model), max_model_len=2048)
    config_file = repository / "base" / "config.yaml"
    # A bound of 0 waiting requests refuses every new one: the bound, deterministically.
    config["scheduler"]["admission"] = {"max_waiting_requests": 0, "retry_after_s": 7}
    config_file.write_text(yaml.safe_dump(config))
    eventually(lambda: short_generation(server, "base").status_code == 503, 20, "the bound applied")
    kserve = short_generation(server, "base")
    assert kserve.headers["retry-after"] == "7" and "max_waiting_requests" in kserve.json()["error"]
    openai = httpx.post(f"{server.url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
    assert openai.status_code == 503 and openai.headers["retry-after"] == "7"
    error = openai.json()["error"]
    assert error["code"] == 503 and "max_waiting_requests" in error["message"], error
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'llumnix:requests_total{engine="none",model_name="base",outcome="overloaded"}' in metrics
    assert 'vllm:admission_rejections_total{model_name="base",reason="max_num_queued_reqs"}' in metrics
    del config["scheduler"]["admission"]
    config_file.write_text(yaml.safe_dump(config))
    eventually(lambda: short_generation(server, "base").status_code == 200, 20, "the bound lifted")


def test_a_retired_instance_hands_what_still_runs_over_by_replay_after_its_drain_deadline(live, tiny_model) -> None:
    server, repository = live
    config = tiny_config(str(tiny_model), instances=2, max_model_len=8192)
    # No rescheduling: nothing migrates the retired instance's request away; the deadline must.
    config["scheduler"]["migration"] = {"rescheduling": False}
    config["scheduler"]["health"] = {"drain_timeout_s": 4}
    write_model(repository, "retiring", config)
    eventually(lambda: {i["state"] for i in instances(server, "retiring").values()} == {"ready"}
               if "retiring" in index(server) and index(server)["retiring"]["state"] == "READY" else False,
               ENGINE_START_TIMEOUT_S, "two instances ready")
    # (7,500 tokens: about 12 s here, longer under load, so it still runs at the deadline)
    undisturbed = StreamedCompletion(server, "retiring", max_tokens=7500).result()
    # The request runs on instance 1, and replays onto an idle instance 0: alone in its batch
    # there, as the undisturbed run was (a batch of two sums in another order, and over
    # thousands of greedy tokens a near-tie can flip).
    set_draining(server, "0", True, "retiring")
    run = StreamedCompletion(server, "retiring", max_tokens=7500).wait_for_tokens(10)
    set_draining(server, "0", False, "retiring")
    assert running_on(server, run.request_id, "retiring") == "1"
    config["instances"] = 1  # instance 1, the newest, is retired
    (repository / "retiring" / "config.yaml").write_text(yaml.safe_dump(config))
    eventually(lambda: instances(server, "retiring")["1"]["state"] == "draining", 30, "instance 1 draining")
    # The drain does not hold the model up: the next edit applies while instance 1 still drains.
    config["scheduler"]["dispatch_policy"] = "queue"
    (repository / "retiring" / "config.yaml").write_text(yaml.safe_dump(config))
    eventually(lambda: _listing(server, "retiring")["dispatch_policy"] == "queue", 5, "the next edit applied")
    assert "1" in instances(server, "retiring"), "instance 1 left before its 4 s drain deadline"
    refused = httpx.post(f"{server.url}/v2/llumnix/models/retiring/instances/1/resume", headers=server.headers)
    assert refused.status_code == 409 and "being retired" in refused.text, refused.text
    run.result()
    assert run.token_ids == undisturbed.token_ids
    eventually(lambda: list(instances(server, "retiring")) == ["0"], 60, "instance 1 gone")
    replays = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
               if line.startswith('llumnix:replays_total{destination="0",model_name="retiring",source="1"}')]
    assert replays and float(replays[0].rsplit(" ", 1)[1]) >= 1, replays
    shutil.rmtree(repository / "retiring")
    eventually(lambda: "retiring" not in index(server), 30, "the model unloaded")


def test_a_request_past_its_timeout_is_aborted_with_an_error(live, tiny_model) -> None:
    server, repository = live
    config = tiny_config(str(tiny_model), max_model_len=2048)  # the engine as it runs: only scheduling changes
    config_file = repository / "base" / "config.yaml"
    config["scheduler"]["admission"] = {"request_timeout_s": 1}
    config_file.write_text(yaml.safe_dump(config))
    body = {"model": "base", "prompt": "Tell me everything.", "max_tokens": 2000, "ignore_eos": True}
    eventually(lambda: httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 504, 30,
               "the timeout applied")
    # Streaming: the tokens so far, then an error event, and no [DONE].
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] != "data: [DONE]" and "request_timeout_s" in lines[-1], lines[-1]
    assert len(lines) > 2  # it streamed before the timeout
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'outcome="timeout"' in metrics
    del config["scheduler"]["admission"]
    config_file.write_text(yaml.safe_dump(config))
    eventually(lambda: httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 4},
                                  timeout=60).status_code == 200, 30, "the timeout lifted")
