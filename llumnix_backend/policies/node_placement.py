"""Which node of a cluster an instance runs on: a pure function of the nodes' free resources,
where the model's instances already run, and the model's `resources.placement`.

- **spread** (the default): the node holding the fewest of the model's instances, so that a node
  lost takes as few of them as possible; among those, the one with the most free GPUs, then CPUs.
- **pack**: the node holding the most of the model's instances that still has room, so that a
  model fills one node before it takes the next.

Ties go to the node listed first (the cluster's own order), so a placement is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llumnix_backend.policies.placement import PlacementError

PlacementMode = Literal["spread", "pack"]


@dataclass(frozen=True)
class NodeResources:
    """A node as placement sees it: what is free on it now, and how many of the model's own
    instances it holds."""

    node_id: str
    free_cpus: float
    free_gpus: float
    model_instances: int = 0


@dataclass(frozen=True)
class InstanceResources:
    """What one instance reserves on its node."""

    cpus: float
    gpus: float = 0.0


def choose_node(nodes: Sequence[NodeResources], demand: InstanceResources, mode: PlacementMode) -> str:
    """The node for one more instance; raises `PlacementError` if no node has room."""
    fitting = [(order, n) for order, n in enumerate(nodes)
               if n.free_cpus >= demand.cpus and n.free_gpus >= demand.gpus]
    if not fitting:
        if not nodes:
            raise PlacementError("the Ray cluster has no live node")
        roomiest = max(nodes, key=lambda n: (n.free_gpus, n.free_cpus))
        raise PlacementError(
            f"no node of the Ray cluster has {demand.cpus:g} CPU(s) and {demand.gpus:g} GPU(s) free for the instance "
            f"(the most free: {roomiest.free_cpus:g} CPU(s) and {roomiest.free_gpus:g} GPU(s) on node {roomiest.node_id})")
    if mode == "spread":
        return min(fitting, key=lambda item: (item[1].model_instances, -item[1].free_gpus, -item[1].free_cpus,
                                              item[0]))[1].node_id
    return min(fitting, key=lambda item: (-item[1].model_instances, item[0]))[1].node_id
