"""Which GPUs an instance runs on: a pure function of the host's GPUs, what the instances already
running hold, and the model's `resources` settings.

A model asks in one of three ways:

- **shared** (the default): each instance goes on the `world_size` GPUs (tensor x pipeline
  parallel) that hold the fewest instances, and shares them with others by memory share
  (`gpu_memory_utilization`). On a one-GPU host every instance lands on GPU 0, as it always did.
- **exclusive** (`resources.gpus_per_instance`): each instance gets GPUs that nothing else uses,
  packed from the lowest index, aligned groups first (GPUs 0-1, 2-3 for two, which on most hosts
  share a switch).
- **pinned** (`resources.gpus`, one list per instance, or Triton's `instance_group ... gpus`):
  an instance takes the first listed placement that no instance of its model uses yet. Pinned
  instances may share a GPU, as Triton's instance groups do, but never one held exclusively.

Instances are placed one at a time (at start, at a scale-up, beside old engines during a
reload), so a GPU freed by a stopped instance is simply free again.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from llumnix_backend.config import ResourceSettings


@dataclass(frozen=True)
class GpuDemand:
    """What one instance of a model needs."""

    world_size: int = 1  # GPUs one instance spans
    exclusive: bool = False
    pinned: tuple[tuple[int, ...], ...] = ()  # placements to take, in order (empty: not pinned)


@dataclass(frozen=True)
class GpuHold:
    """GPUs an instance holds now."""

    owner: str  # "model/instance", for messages
    gpus: tuple[int, ...]
    exclusive: bool


class PlacementError(ValueError):
    """No GPUs can be given as asked; the message says what is short."""


def place(demand: GpuDemand, gpus: Sequence[int], holds: Sequence[GpuHold],
          mine: Sequence[tuple[int, ...]] = ()) -> tuple[int, ...]:
    """The GPUs for one more instance of a model. `gpus`: the host's GPU indices; `holds`:
    what every running instance holds (the model's own included); `mine`: the placements of
    the model's own instances. Raises `PlacementError`."""
    if not gpus:
        if demand.exclusive or demand.pinned:
            raise PlacementError("this host has no GPU (the engines run on the CPU): remove resources.gpus "
                                 "and resources.gpus_per_instance")
        return ()
    exclusive_owner = {g: h.owner for h in holds if h.exclusive for g in h.gpus}
    if demand.pinned:
        return _pinned(demand, set(gpus), exclusive_owner, mine)
    if demand.world_size > len(gpus):
        raise PlacementError(f"an instance needs {demand.world_size} GPUs (tensor x pipeline parallel); "
                             f"this host has {len(gpus)}")
    if demand.exclusive:
        return _exclusive(demand.world_size, gpus, holds)
    open_gpus = [g for g in gpus if g not in exclusive_owner]
    if len(open_gpus) < demand.world_size:
        raise PlacementError(f"an instance needs {demand.world_size} GPU(s); {_held_by(exclusive_owner)}")
    load = Counter(g for h in holds for g in h.gpus)
    return tuple(sorted(sorted(open_gpus, key=lambda g: (load[g], g))[:demand.world_size]))


def _pinned(demand: GpuDemand, present: set[int], exclusive_owner: dict[int, str],
            mine: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    unused = Counter(demand.pinned) - Counter(mine)
    choice = next((p for p in demand.pinned if unused[p] > 0), None)
    if choice is None:
        raise PlacementError(f"resources.gpus lists {len(demand.pinned)} placement(s), and every one is in use")
    if demand.world_size and len(choice) != demand.world_size:
        raise PlacementError(f"resources.gpus entry {list(choice)} has {len(choice)} GPU(s); an instance spans "
                             f"{demand.world_size} (tensor x pipeline parallel)")
    missing = sorted(set(choice) - present)
    if missing:
        raise PlacementError(f"resources.gpus names GPU {missing[0]}; this host has GPUs 0 to {max(present)}")
    taken = {g: exclusive_owner[g] for g in choice if g in exclusive_owner}
    if taken:
        raise PlacementError(f"resources.gpus names {_held_by(taken)}")
    return choice


def _exclusive(size: int, gpus: Sequence[int], holds: Sequence[GpuHold]) -> tuple[int, ...]:
    used = {g: h.owner for h in holds for g in h.gpus}
    free = [g for g in gpus if g not in used]
    if len(free) < size:
        raise PlacementError(f"an instance needs {size} GPU(s) of its own (resources.gpus_per_instance); "
                             f"{len(free)} of {len(gpus)} are free ({_held_by(used)})")
    free_set = set(free)
    aligned = next((group for start in range(0, len(gpus) - size + 1, size)
                    if set(group := tuple(gpus[start:start + size])) <= free_set), None)
    return aligned or tuple(free[:size])


def _held_by(owners: dict[int, str]) -> str:
    return ", ".join(f"GPU {g} is held by {o}" for g, o in sorted(owners.items())) or "no GPU is held"


def instances_per_gpu(demand: GpuDemand, instances: int, num_gpus: int) -> int:
    """How many of the model's own instances share a GPU once all are placed: what an
    instance's default memory share divides by."""
    if num_gpus == 0 or demand.exclusive:
        return 1
    if demand.pinned:
        return max(Counter(g for p in demand.pinned[:instances] for g in p).values(), default=1)
    return math.ceil(instances * demand.world_size / num_gpus)


@dataclass(frozen=True)
class GpuPlacement:
    """Where an instance runs: its GPUs (none on a CPU host) and how many instances of its
    model share each (what its default memory share divides by)."""

    gpus: tuple[int, ...] = ()
    sharing: int = 1


def demand_of(resources: ResourceSettings, world_size: int) -> GpuDemand:
    """A model's `resources` section as a demand; `world_size`: the GPUs one instance spans."""
    return GpuDemand(world_size=world_size, exclusive=resources.gpus_per_instance is not None,
                     pinned=resources.gpus or ())
