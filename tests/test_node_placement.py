"""Node placement over described Ray clusters, and the host-segment copy the network transport
makes between nodes: no cluster, no engines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.policies.node_placement import InstanceResources, NodeResources, choose_node
from llumnix_backend.policies.placement import PlacementError

nodes_st = st.lists(
    st.builds(NodeResources, node_id=st.uuids().map(str), free_cpus=st.integers(0, 8).map(float),
              free_gpus=st.integers(0, 8).map(float), model_instances=st.integers(0, 4)),
    min_size=1, max_size=6, unique_by=lambda n: n.node_id)
demand_st = st.builds(InstanceResources, cpus=st.integers(1, 4).map(float), gpus=st.integers(0, 2).map(float))


def fits(node: NodeResources, demand: InstanceResources) -> bool:
    return node.free_cpus >= demand.cpus and node.free_gpus >= demand.gpus


@given(nodes_st, demand_st, st.sampled_from(["spread", "pack"]))
def test_the_chosen_node_has_room_and_is_the_policys_pick(nodes, demand, mode) -> None:
    fitting = [n for n in nodes if fits(n, demand)]
    if not fitting:
        with pytest.raises(PlacementError, match="no node of the Ray cluster has"):
            choose_node(nodes, demand, mode)
        return
    chosen = next(n for n in nodes if n.node_id == choose_node(nodes, demand, mode))
    assert fits(chosen, demand)
    counts = [n.model_instances for n in fitting]
    assert chosen.model_instances == (min(counts) if mode == "spread" else max(counts))


def place_all(nodes: list[NodeResources], count: int, mode: str) -> dict[str, int]:
    """Place `count` one-CPU instances one after another, as a model's start does."""
    demand = InstanceResources(cpus=1)
    for _ in range(count):
        chosen = choose_node(nodes, demand, mode)
        nodes = [NodeResources(n.node_id, n.free_cpus - 1, n.free_gpus, n.model_instances + 1)
                 if n.node_id == chosen else n for n in nodes]
    return {n.node_id: n.model_instances for n in nodes}


@given(st.integers(1, 5), st.integers(1, 12))
def test_spread_balances_a_model_over_equal_nodes(node_count, instances) -> None:
    nodes = [NodeResources(f"node-{i}", free_cpus=16, free_gpus=0) for i in range(node_count)]
    counts = place_all(nodes, instances, "spread").values()
    assert max(counts) - min(counts) <= 1 and sum(counts) == instances


def test_pack_fills_a_node_before_the_next() -> None:
    nodes = [NodeResources("a", free_cpus=2, free_gpus=0), NodeResources("b", free_cpus=2, free_gpus=0)]
    assert place_all(nodes, 3, "pack") == {"a": 2, "b": 1}


def test_spread_prefers_the_node_with_more_free_gpus_then_the_first_listed() -> None:
    demand = InstanceResources(cpus=1, gpus=1)
    nodes = [NodeResources("a", 4, 1), NodeResources("b", 4, 3), NodeResources("c", 4, 3)]
    assert choose_node(nodes, demand, "spread") == "b"


def test_no_room_says_what_the_roomiest_node_has() -> None:
    with pytest.raises(PlacementError, match=r"2 GPU\(s\) free .* 1 GPU\(s\) on node b"):
        choose_node([NodeResources("a", 8, 0), NodeResources("b", 8, 1)], InstanceResources(1, 2), "spread")
    with pytest.raises(PlacementError, match="no live node"):
        choose_node([], InstanceResources(1), "pack")


@given(st.lists(st.integers(1, 64), min_size=1, max_size=4), st.integers(1, 3), st.data())
def test_positions_copied_between_host_segments_arrive_intact(layer_units, ranks, data) -> None:
    from llumnix_vllm.kv_transport import TransferSegment, read_positions, write_positions

    layer_bytes = [4 * u for u in layer_units]
    capacity = data.draw(st.integers(1, 8))
    first = data.draw(st.integers(0, capacity - 1))
    end = data.draw(st.integers(first + 1, capacity))
    source = TransferSegment(capacity, sum(layer_bytes), ranks=ranks)
    destination = TransferSegment(capacity, sum(layer_bytes), ranks=ranks)
    try:
        for rank in range(ranks):
            with open(source.spec.rank_path(rank), "r+b") as f:
                f.write(torch.randint(0, 256, (capacity * sum(layer_bytes),), dtype=torch.uint8).numpy().tobytes())
        write_positions(destination.spec, layer_bytes, first, read_positions(source.spec, layer_bytes, first, end))
        for rank in range(ranks):
            sent, got = (open(s.spec.rank_path(rank), "rb").read() for s in (source, destination))
            offset = 0
            for size in layer_bytes:  # layer-major: the run of each layer, and nothing outside it
                run = slice(offset + first * size, offset + end * size)
                assert got[run] == sent[run]
                assert got[offset:run.start] == bytes(run.start - offset)
                assert got[run.stop:offset + capacity * size] == bytes(offset + capacity * size - run.stop)
                offset += capacity * size
    finally:
        source.close()
        destination.close()
