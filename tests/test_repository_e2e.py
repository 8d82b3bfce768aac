"""The repository API with explicit model control, through `tritonclient` and httpx, on a real
server whose models run on real vLLM CPU instances.

The repository holds `first` (loaded at start with --load-model), `second` (not loaded), and
two folders in Triton's format: `triton` (versions 1 and 2; version 1's model.json is broken, so
serving it would fail) and `triton-typo` (config.pbtxt with a typo).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from conftest import ENGINE_START_TIMEOUT_S, tiny_config, write_model
from llumnix_client import StreamedCompletion, instances, short_generation
from llumnix_server.launcher import ServerProcess, llumnix_server, wait_for_repository

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> ServerProcess:
    repository = tmp_path_factory.mktemp("explicit-repository")
    for name in ("first", "second"):
        write_model(repository, name, tiny_config(str(tiny_model), max_model_len=2048))
    write_triton_model(repository / "triton", tiny_model)
    write_triton_model(repository / "triton-typo", tiny_model, typo=True)
    server = llumnix_server(repository, repository.parent / "explicit-server.log",
                            extra_args=("--model-control-mode", "explicit", "--load-model", "first",
                                        "--load-model", "ghost")).start()
    try:
        wait_for_repository(server, ENGINE_START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def write_triton_model(folder: Path, weights: Path, typo: bool = False) -> None:
    folder.mkdir()
    (folder / "config.pbtxt").write_text(
        'backend: "vllm"\n'
        f'instance_group [ {{ {"cuont" if typo else "count"}: 1, kind: KIND_MODEL }} ]\n'
        'parameters { key: "scheduler.dispatch_policy" value: { string_value: "queue" } }\n'
        'parameters { key: "resources.cpu_kv_cache_gib" value: { string_value: "0.25" } }\n')
    for version, engine in (("1", '{"model": '), ("2", json.dumps({"model": "weights", "max_model_len": 512}))):
        (folder / version).mkdir()
        (folder / version / "model.json").write_text(engine)
        (folder / version / "weights").symlink_to(weights)  # relative engine paths start here


@pytest.fixture()
def client(explicit: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(explicit.url.removeprefix("http://"), network_timeout=300)


def index(client: triton.InferenceServerClient) -> dict[str, dict]:
    return {m["name"]: m for m in client.get_model_repository_index()}


def test_only_the_models_named_at_start_are_loaded(explicit, client) -> None:
    listed = index(client)
    assert listed["first"]["state"] == "READY"
    assert (listed["second"]["state"], listed["second"]["reason"]) == ("UNAVAILABLE", "not loaded")
    assert client.is_model_ready("first") and not client.is_model_ready("second")
    assert short_generation(explicit, "first").status_code == 200
    assert short_generation(explicit, "second").status_code == 503
    # Named at start but without a folder: listed, with the reason.
    ghost = listed["ghost"]
    assert ghost["state"] == "UNAVAILABLE" and "--load-model ghost: no such model folder" in ghost["reason"], ghost


def test_load_serve_and_unload_a_model_with_tritonclient(explicit, client) -> None:
    client.load_model("second")
    assert client.is_model_ready("second") and index(client)["second"]["state"] == "READY"
    assert short_generation(explicit, "second").status_code == 200
    # A request running when the unload comes finishes whole; the model then goes.
    running = StreamedCompletion(explicit, "second", max_tokens=300).wait_for_tokens(5)
    client.unload_model("second")
    assert running.result().finish_reason == "length" and len(running.token_ids) == 300
    assert not client.is_model_ready("second")
    assert (index(client)["second"]["state"], index(client)["second"]["reason"]) == ("UNAVAILABLE", "unloaded")
    assert short_generation(explicit, "second").status_code == 503
    client.unload_model("second")  # unloading what is not loaded is not an error (as in Triton)
    metrics = httpx.get(f"{explicit.url}/metrics").text
    for series in ('llumnix:model_operations_total{model_name="second",operation="load",outcome="success"} 1.0',
                   'llumnix:model_operations_total{model_name="second",operation="unload",outcome="success"} 1.0',
                   'llumnix:model_state{model_name="second",state="UNAVAILABLE"} 1.0',
                   'llumnix:model_load_duration_seconds_count{model_name="second"} 1.0'):
        assert series in metrics, series


def test_reload_with_a_config_from_the_request_switches_versions_without_dropping_requests(explicit, client,
                                                                                          tiny_model) -> None:
    running = StreamedCompletion(explicit, "first", max_tokens=300).wait_for_tokens(5)
    override = tiny_config(str(tiny_model), max_model_len=1024)
    client.load_model("first", config=json.dumps(override))
    assert running.result().finish_reason == "length" and len(running.token_ids) == 300
    config = httpx.get(f"{explicit.url}/v2/models/first/config").json()
    assert config["engine"]["max_model_len"] == 1024, config
    assert short_generation(explicit, "first").status_code == 200


def test_a_scheduler_change_is_applied_in_place(explicit, client, tiny_model) -> None:
    engine_before = instances(explicit, "first")["0"]["snapshot"]["engine_pid"]
    changed = tiny_config(str(tiny_model), dispatch="queue", max_model_len=1024)
    client.load_model("first", config=json.dumps(changed))
    listing = httpx.get(f"{explicit.url}/v2/llumnix/models/first/instances").json()
    assert listing["dispatch_policy"] == "queue"
    assert instances(explicit, "first")["0"]["snapshot"]["engine_pid"] == engine_before  # not restarted
    assert short_generation(explicit, "first").status_code == 200


def test_an_invalid_config_is_refused_and_the_loaded_version_keeps_serving(explicit, client) -> None:
    with pytest.raises(InferenceServerException, match="load request: parameters.config: colour: unknown key"):
        client.load_model("first", config=json.dumps({"instances": 1, "colour": "red"}))
    assert client.is_model_ready("first") and short_generation(explicit, "first").status_code == 200
    listed = index(client)["first"]
    assert listed["state"] == "READY" and "the previous one keeps serving" in listed["reason"], listed
    response = httpx.post(f"{explicit.url}/v2/repository/models/first/load",
                          json={"parameters": {"config": "{not json"}})
    assert response.status_code == 400 and "parameters.config is not valid JSON" in response.json()["error"]
    metrics = httpx.get(f"{explicit.url}/metrics").text
    assert 'llumnix:model_operations_total{model_name="first",operation="reload",outcome="failure"} 1.0' in metrics


def test_a_triton_format_folder_serves_its_highest_version(explicit, client) -> None:
    client.load_model("triton")
    assert client.is_model_ready("triton")
    assert index(client)["triton"]["version"] == "2"
    assert client.get_model_metadata("triton")["versions"] == ["2"]
    config = httpx.get(f"{explicit.url}/v2/models/triton/config").json()
    assert config["instance_group"][0]["count"] == 1, config
    assert config["parameters"]["dispatch_policy"]["string_value"] == "queue", config
    assert config["engine"]["max_model_len"] == 512, config
    response = short_generation(explicit, "triton")
    assert response.status_code == 200 and response.json()["model_version"] == "2", response.text


def test_a_typo_in_config_pbtxt_is_reported_with_its_line(explicit, client) -> None:
    with pytest.raises(InferenceServerException, match=r"config.pbtxt: line 2, column \d+: .*no field named \"cuont\""):
        client.load_model("triton-typo")
    listed = index(client)["triton-typo"]
    assert listed["state"] == "UNAVAILABLE" and "line 2, column" in listed["reason"], listed


# ("/../" itself never reaches a server: clients resolve it; its encoded form does.)
@pytest.mark.parametrize("path", ["%2E%2E", "a%2Fb", "a/b", "has%20space", "-dash"])
def test_a_model_name_that_is_not_a_plain_folder_name_is_refused(explicit, path) -> None:
    for action in ("load", "unload"):
        response = httpx.post(f"{explicit.url}/v2/repository/models/{path}/{action}")
        assert response.status_code == 400, (path, action, response.text)
        assert "invalid model name" in response.json()["error"]


def test_a_model_without_a_folder_is_refused(explicit) -> None:
    response = httpx.post(f"{explicit.url}/v2/repository/models/nowhere/load")
    assert response.status_code == 400 and "no folder" in response.json()["error"], response.text
    assert "nowhere" not in {m["name"] for m in httpx.post(f"{explicit.url}/v2/repository/index").json()}


def test_without_explicit_control_models_cannot_be_loaded_or_unloaded(serving) -> None:
    """`serving` runs with the default control mode, poll: the folder decides, not the API."""
    for action in ("load", "unload"):
        response = httpx.post(f"{serving.url}/v2/repository/models/alpha/{action}", headers=serving.headers)
        assert response.status_code == 400, response.text
        assert "--model-control-mode poll" in response.json()["error"]
