"""The host's GPUs and which instance holds which. One inventory per server, shared by all
models, so that no two models place exclusive instances on one GPU; the choice itself is
`policies.placement.place`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llumnix_backend.policies.placement import GpuDemand, GpuHold, place


@dataclass(frozen=True)
class GpuDevice:
    index: int  # as the engines number it (within CUDA_VISIBLE_DEVICES, if set)
    name: str = ""
    memory_bytes: int = 0


class GpuInventory:
    def __init__(self, devices: Sequence[GpuDevice] = ()) -> None:
        self.devices = tuple(devices)
        self._holds: dict[str, GpuHold] = {}

    def acquire(self, owner: str, demand: GpuDemand, mine: Sequence[tuple[int, ...]] = ()) -> tuple[int, ...]:
        """Place one instance (`owner`: "model/instance") and hold its GPUs until `release`;
        raises `PlacementError`."""
        self.release(owner)
        gpus = place(demand, [d.index for d in self.devices], list(self._holds.values()), mine)
        self._holds[owner] = GpuHold(owner, gpus, demand.exclusive)
        return gpus

    def release(self, owner: str) -> None:
        self._holds.pop(owner, None)
