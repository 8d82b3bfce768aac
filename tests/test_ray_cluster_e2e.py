"""Multi-node serving on a real Ray cluster of two nodes on this machine (`ray.cluster_utils`):
instances spread over the nodes, a greedy stream migrated from one node's instance to the
other's through the network transport (Ray's object store), and a node stopped under load.

The two nodes share this host's memory, but each is its own Ray node (its own raylet and object
store): placement and the transport go by node identity, as they would across machines.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ENGINE_START_TIMEOUT_S, ready_server, tiny_config, write_model
from llumnix_client import StreamedCompletion, instances, migrate, running_on

from llumnix_server.launcher import ServerProcess

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.engine

MODEL = "spread"
TOKENS = 1200


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[object, object]]:
    """A head node and a second node, 2 CPUs each (one instance takes 1)."""
    cluster = ray_cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 200 << 20})
    try:
        second = cluster.add_node(num_cpus=2, object_store_memory=200 << 20)
        cluster.wait_for_nodes()
        yield cluster, second
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    ray, _ = cluster
    repository = tmp_path_factory.mktemp("ray-repository")
    config = tiny_config(str(tiny_model), instances=2, max_model_len=4096)
    config["resources"].update(cpu_threads=1, placement="spread")
    # Only the test migrates; the network path is what auto picks between two nodes.
    # No final stage short enough to stop early at, so that a migration runs all its stages.
    config["scheduler"]["migration"] = {"rescheduling": False, "stage_chunk_mib": 0.5, "final_stage_blocks": 0}
    write_model(repository, MODEL, config)
    with ready_server(repository, "ray-server.log", [MODEL, MODEL],
                      extra_args=("--ray-address", ray.address)) as server:
        yield server


@pytest.fixture(scope="module")
def baseline(server: ServerProcess) -> StreamedCompletion:
    return StreamedCompletion(server, MODEL, max_tokens=TOKENS).result()


def nodes_of(server: ServerProcess) -> dict[str, str]:
    return {i: info["node"] for i, info in instances(server, MODEL).items()}


def samples(metrics: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            found.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return found


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def test_spread_puts_one_instance_on_each_node(cluster, server) -> None:
    ray, second = cluster
    listed = instances(server, MODEL)
    assert all(info["state"] == "ready" for info in listed.values()), listed
    assert set(nodes_of(server).values()) == {ray.head_node.node_id, second.node_id}
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    exported = {(labels["engine"], labels["node"]) for labels, value in samples(metrics, "llumnix:instance_node")
                if labels["model_name"] == MODEL and value == 1.0}
    assert exported == set(nodes_of(server).items()), metrics


def test_a_stream_migrated_across_nodes_is_token_identical(server, baseline) -> None:
    """The KV crosses in several stages of 0.5 MiB chunks before the final copy: each chunk's
    positions reach the destination's segment with the preload that follows it."""
    run = StreamedCompletion(server, MODEL, max_tokens=TOKENS)
    run.wait_for_tokens(600)
    source = running_on(server, run.request_id, MODEL)
    destination = {"0": "1", "1": "0"}[source]
    response = migrate(server, run.request_id, destination, MODEL)
    assert response.status_code == 200, response.text
    report = response.json()
    run.result()
    assert report["committed"], report
    assert report["route"] == "network" and report["stages"] >= 2, report
    assert report["recomputed_tokens"] == 1  # the KV came across: only the last token was computed
    assert run.token_ids == baseline.token_ids
    assert "".join(run.text) == "".join(baseline.text)


def engine_of(ray_node) -> psutil.Process:
    """The engine process of the one instance on a Ray node (`cluster_utils` node): the
    EngineCore child of the EngineActor worker its raylet started."""
    raylet = psutil.Process(ray_node.all_processes["raylet"][0].process.pid)
    actors = [p for p in raylet.children(recursive=True) if "ray::EngineActor" in " ".join(p.cmdline())]
    assert len(actors) == 1, actors
    engines = [p for p in actors[0].children() if p.name().startswith("VLLM::EngineCore")]
    assert len(engines) == 1, actors[0].children()
    return engines[0]


def test_a_migration_whose_stage_fails_on_the_other_node_leaves_the_stream_on_its_source(cluster, server,
                                                                                         baseline) -> None:
    """The destination's engine hangs (SIGSTOP) while the stream migrates to it: the stage that
    preloads it times out, the migration aborts, and the stream goes on, unbroken, where it was."""
    ray, second = cluster
    run = StreamedCompletion(server, MODEL, max_tokens=TOKENS)
    run.wait_for_tokens(100)
    source = running_on(server, run.request_id, MODEL)
    destination = {"0": "1", "1": "0"}[source]
    ray_node = second if nodes_of(server)[destination] == second.node_id else ray.head_node
    hung = engine_of(ray_node)
    hung.suspend()
    try:  # (a short stage timeout for this migration alone, so that the failing stage ends soon)
        response = migrate(server, run.request_id, destination, MODEL, stage_timeout_s=2)
    finally:
        hung.resume()
    assert response.status_code == 200, response.text
    report = response.json()
    assert not report["committed"] and report["route"] == "network", report
    assert "timed out" in report["reason"], report
    run.result()
    assert run.token_ids == baseline.token_ids
    # The aborted preload does not stay on the destination, which serves again.
    wait_until(lambda: not (instances(server, MODEL)[destination]["snapshot"] or {}).get("running"),
               30, "the destination holds no request of the aborted migration")
    assert instances(server, MODEL)[destination]["state"] == "ready"


def test_a_stopped_node_replays_its_requests_on_the_other_and_its_instance_restarts_there(cluster, server,
                                                                                          baseline) -> None:
    ray, second = cluster
    runs = [StreamedCompletion(server, MODEL, max_tokens=TOKENS) for _ in range(4)]
    for run in runs:
        run.wait_for_tokens(20, timeout=60)
    lost = next(i for i, node in nodes_of(server).items() if node == second.node_id)
    assert lost in {running_on(server, run.request_id, MODEL) for run in runs}
    ray.remove_node(second)
    for run in runs:
        run.result()
        assert run.finish_reason == "length" and run.token_ids == baseline.token_ids
    # The lost instance comes back on the node that is left.
    wait_until(lambda: all(info["state"] == "ready" for info in instances(server, MODEL).values()),
               ENGINE_START_TIMEOUT_S, f"instance {lost} restarted")
    assert set(nodes_of(server).values()) == {ray.head_node.node_id}


def engine_processes() -> list[psutil.Process]:
    """The instances' actors and the engine processes they started, on every node (all on this
    host; other servers of the session run engines too, but not in actors)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "ray::EngineActor" in " ".join(process.info["cmdline"] or []):
            found += [process, *process.children(recursive=True)]
    return found


def test_killing_the_server_ends_its_instances_on_every_node(server) -> None:
    """Last in the module: the server's actors are its own (not detached), so Ray ends them with
    it, and their engines notice they are orphaned."""
    engines = engine_processes()
    assert len(engines) >= 4  # two actors, each with its engine process
    server.stop(signal.SIGKILL)
    _, alive = psutil.wait_procs(engines, timeout=60)
    assert not alive, [p.pid for p in alive]
