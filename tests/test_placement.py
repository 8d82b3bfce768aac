"""GPU placement over described sets of devices: no GPUs needed, no engines."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.config import ConfigError, parse_model_config
from llumnix_backend.gpus import GpuDevice, GpuInventory
from llumnix_backend.policies.placement import (
    GpuDemand,
    GpuHold,
    PlacementError,
    demand_of,
    instances_per_gpu,
    place,
)
from llumnix_backend.triton_config import triton_instance_groups

EIGHT = list(range(8))
SHARED = GpuDemand()
ONE_EACH = GpuDemand(world_size=1, exclusive=True)
TWO_EACH = GpuDemand(world_size=2, exclusive=True)


def inventory(n: int) -> GpuInventory:
    return GpuInventory([GpuDevice(i, "H200", 141 << 30) for i in range(n)])


def start(gpus: GpuInventory, model: str, demand: GpuDemand, count: int) -> list[tuple[int, ...]]:
    placed: list[tuple[int, ...]] = []
    for i in range(count):
        placed.append(gpus.acquire(f"{model}/{i}", demand, placed))
    return placed


def test_one_gpu_host_shares_gpu_0_as_before() -> None:
    assert start(inventory(1), "m", SHARED, 4) == [(0,)] * 4
    assert instances_per_gpu(SHARED, 4, 1) == 4  # each gets 0.9 / 4 of it, as before


def test_shared_instances_spread_over_every_gpu() -> None:
    assert start(inventory(4), "m", SHARED, 6) == [(0,), (1,), (2,), (3,), (0,), (1,)]
    assert instances_per_gpu(SHARED, 6, 4) == 2


def test_exclusive_instances_pack_and_tensor_parallel_ones_take_aligned_pairs() -> None:
    gpus = inventory(8)
    assert start(gpus, "small", ONE_EACH, 2) == [(0,), (1,)]
    assert start(gpus, "big", TWO_EACH, 3) == [(2, 3), (4, 5), (6, 7)]
    with pytest.raises(PlacementError, match=r"needs 1 GPU\(s\) of its own.*0 of 8 are free.*GPU 0 is held by small/0"):
        gpus.acquire("late/0", ONE_EACH)


def test_exclusive_falls_back_to_any_free_gpus_when_no_aligned_group_is_free() -> None:
    holds = [GpuHold("a/0", (1,), True), GpuHold("a/1", (2,), True)]
    assert place(TWO_EACH, [0, 1, 2, 3], holds) == (0, 3)


def test_a_shared_instance_never_lands_on_an_exclusive_gpu() -> None:
    gpus = inventory(2)
    gpus.acquire("owner/0", ONE_EACH)
    assert start(gpus, "guest", SHARED, 3) == [(1,)] * 3
    with pytest.raises(PlacementError, match="GPU 0 is held by owner/0"):
        gpus.acquire("more/0", ONE_EACH)


def test_pinned_lists_are_taken_in_order_and_may_share_a_gpu() -> None:
    demand = GpuDemand(pinned=((0,), (0,), (1,), (1,)))
    gpus = inventory(2)
    assert start(gpus, "m", demand, 4) == [(0,), (0,), (1,), (1,)]
    assert instances_per_gpu(demand, 4, 2) == 2
    with pytest.raises(PlacementError, match="lists 4 placement"):
        gpus.acquire("m/4", demand, [(0,), (0,), (1,), (1,)])


def test_pinned_errors_name_the_gpu() -> None:
    with pytest.raises(PlacementError, match="names GPU 5; this host has GPUs 0 to 3"):
        place(GpuDemand(pinned=((5,),)), [0, 1, 2, 3], [])
    with pytest.raises(PlacementError, match=r"entry \[0\] has 1 GPU\(s\); an instance spans 2"):
        place(GpuDemand(world_size=2, pinned=((0,),)), [0, 1], [])
    with pytest.raises(PlacementError, match="GPU 2 is held by other/0"):
        place(GpuDemand(pinned=((2,),)), [0, 1, 2, 3], [GpuHold("other/0", (2,), True)])


def test_a_cpu_host_places_nothing_and_refuses_gpu_settings() -> None:
    assert place(SHARED, [], []) == ()
    for demand in (ONE_EACH, GpuDemand(pinned=((0,),))):
        with pytest.raises(PlacementError, match="this host has no GPU"):
            place(demand, [], [])


def test_tensor_parallelism_wider_than_the_host_is_refused() -> None:
    with pytest.raises(PlacementError, match="needs 4 GPUs .* this host has 2"):
        place(GpuDemand(world_size=4), [0, 1], [])


def test_gpus_freed_by_a_reload_or_an_unload_are_reused() -> None:
    gpus = inventory(4)
    old = start(gpus, "m-v1", ONE_EACH, 4)
    with pytest.raises(PlacementError):
        gpus.acquire("m-v2/0", ONE_EACH)  # the old version still holds all four
    for i in range(4):
        gpus.release(f"m-v1/{i}")
    assert start(gpus, "m-v2", ONE_EACH, 4) == old


def test_a_restart_keeps_its_gpus() -> None:
    gpus = inventory(4)
    start(gpus, "m", ONE_EACH, 4)
    gpus.release("m/2")
    assert gpus.acquire("m/2", ONE_EACH) == (2,)


@given(st.integers(1, 8), st.lists(st.sampled_from([1, 2, 4]), max_size=12))
def test_exclusive_placements_never_overlap_and_fail_only_when_too_few_are_free(num_gpus: int, sizes: list[int]) -> None:
    gpus = inventory(num_gpus)
    held: Counter[int] = Counter()
    for i, size in enumerate(sizes):
        free = num_gpus - sum(held.values())
        try:
            got = gpus.acquire(f"m{i}/0", GpuDemand(world_size=size, exclusive=True))
        except PlacementError:
            assert free < size or size > num_gpus
            continue
        assert len(got) == size and len(set(got)) == size
        assert not set(got) & set(held), (got, held)
        held.update(got)


@given(st.integers(1, 8), st.integers(1, 40))
def test_shared_placements_stay_balanced(num_gpus: int, count: int) -> None:
    per_gpu = Counter(g for p in start(inventory(num_gpus), "m", SHARED, count) for g in p)
    assert max(per_gpu.values()) - min(per_gpu.get(g, 0) for g in range(num_gpus)) <= 1
    assert max(per_gpu.values()) == instances_per_gpu(SHARED, count, num_gpus)


# --- the config that asks ------------------------------------------------------------------


def test_config_resources_become_a_demand() -> None:
    config = parse_model_config({"instances": 2, "resources": {"gpus_per_instance": 2}}, "c.yaml")
    assert demand_of(config.resources, 2) == TWO_EACH
    config = parse_model_config({"instances": 2, "resources": {"gpus": [[0], [3]]}}, "c.yaml")
    assert demand_of(config.resources, 1) == GpuDemand(pinned=((0,), (3,)))


@pytest.mark.parametrize(("resources", "instances", "message"), [
    ({"gpus": [[0]]}, 2, "resources.gpus lists 1 placement(s) for 2 instances"),
    ({"gpus": [[0, 0]]}, 1, "distinct GPU indices"),
    ({"gpus": [[-1]]}, 1, "distinct GPU indices"),
    ({"gpus": [[0, 1]], "gpus_per_instance": 1}, 1, "has 2 GPU"),
    ({"gpus_per_instance": 0}, 1, "greater than or equal to 1"),
])
def test_bad_gpu_settings_name_the_field(resources: dict, instances: int, message: str) -> None:
    with pytest.raises(ConfigError, match="resources|gpus") as failure:
        parse_model_config({"instances": instances, "resources": resources}, "c.yaml")
    assert message in str(failure.value)


def test_triton_kind_gpu_groups_mean_count_instances_on_each_listed_gpu() -> None:
    assert triton_instance_groups([("KIND_GPU", 2, [0, 1])], num_gpus=4) == (4, ((0,), (0,), (1,), (1,)))
    # Without a list: on each GPU of the host, as in Triton.
    assert triton_instance_groups([("KIND_GPU", 1, [])], num_gpus=3) == (3, ((0,), (1,), (2,)))
    # Other kinds only count; a host without GPUs counts a KIND_GPU group's instances too.
    assert triton_instance_groups([("KIND_MODEL", 2, []), ("KIND_AUTO", 1, [])], num_gpus=8) == (3, None)
    assert triton_instance_groups([("KIND_GPU", 2, [])], num_gpus=0) == (2, None)


@pytest.mark.parametrize("num_gpus", [4, 8])
def test_one_7b_instance_per_gpu_as_the_multi_gpu_policy_run_needs(num_gpus: int) -> None:
    """Issue 14's layout: one instance of its own per GPU, each instance's KV share of its GPU
    undivided; then the migration benchmark's two instances on different GPUs."""
    config = parse_model_config({"instances": num_gpus, "resources": {"gpus_per_instance": 1}}, "c.yaml")
    demand = demand_of(config.resources, 1)
    gpus = inventory(num_gpus)
    assert start(gpus, "bench", demand, num_gpus) == [(g,) for g in range(num_gpus)]
    assert instances_per_gpu(demand, num_gpus, num_gpus) == 1
    with pytest.raises(PlacementError):
        gpus.acquire("bench/extra", demand)
    pair = parse_model_config({"instances": 2, "resources": {"gpus": [[0], [num_gpus - 1]]}}, "c.yaml")
    assert start(inventory(num_gpus), "migration", demand_of(pair.resources, 1), 2) == [(0,), (num_gpus - 1,)]
