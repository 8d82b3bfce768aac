"""Moving KV-cache blocks between engine processes on one host, through shared memory.

A `TransferSegment` is a shared-memory area the front end creates for one migration. The
source's worker copies blocks of the request into it, by their position in the request
(block 0 holds tokens 0..block_size-1, ...); the destination's worker copies them out into
the blocks its scheduler allocated. Blocks travel as opaque bytes, layer by layer, so any KV
layout works as long as both engines run the same model, dtype, block size and layout.

This is the host-memory transport; a device path (CUDA IPC, NCCL) can take the same interface.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch


# Shared memory as plain files: tmpfs on Linux. (multiprocessing.shared_memory would register
# every attach with a resource tracker that unlinks segments behind their owner's back.)
SEGMENT_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass(frozen=True)
class SegmentSpec:
    """What a worker needs to find a segment: its path and its size in blocks."""

    path: str
    capacity_blocks: int
    block_bytes: int  # one block of every layer


class TransferSegment:
    """The front end's handle: creates the shared memory and removes it when closed."""

    def __init__(self, capacity_blocks: int, block_bytes: int) -> None:
        path = os.path.join(SEGMENT_DIR, f"llumnix-kv-{uuid.uuid4().hex[:16]}")
        with open(path, "wb") as f:
            f.truncate(max(1, capacity_blocks * block_bytes))
        self.spec = SegmentSpec(path, capacity_blocks, block_bytes)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spec.path)


@contextlib.contextmanager
def _mapped(spec: SegmentSpec) -> Iterator[mmap.mmap]:
    with open(spec.path, "r+b") as f:
        area = mmap.mmap(f.fileno(), spec.capacity_blocks * spec.block_bytes)
    try:
        yield area
    finally:
        # Views of the buffer still alive (in a traceback, say) make close() refuse; the
        # mapping then goes with them.
        with contextlib.suppress(BufferError):
            area.close()


class KvBlockIO:
    """Copies whole KV blocks between a worker's cache tensors and a transfer segment."""

    def __init__(self, kv_caches: list[torch.Tensor], num_blocks: int) -> None:
        seen: set[int] = set()
        self._layers: list[torch.Tensor] = []
        for tensor in kv_caches:
            if tensor is None or tensor.data_ptr() in seen:
                continue  # layers sharing one cache are moved once
            seen.add(tensor.data_ptr())
            block_dim = next(d for d, size in enumerate(tensor.shape) if size == num_blocks)
            self._layers.append(tensor.movedim(block_dim, 0))  # [num_blocks, ...] in every layout
        self._layer_bytes = [layer[0].numel() * layer.element_size() for layer in self._layers]
        self.block_bytes = sum(self._layer_bytes)

    def _segment_views(self, mapped: mmap.mmap, spec: SegmentSpec) -> list[torch.Tensor]:
        if spec.block_bytes != self.block_bytes:
            raise ValueError(f"segment blocks are {spec.block_bytes} bytes, this engine's are {self.block_bytes}")
        area = torch.frombuffer(mapped, dtype=torch.uint8, count=spec.capacity_blocks * spec.block_bytes)
        area = area.view(spec.capacity_blocks, spec.block_bytes)
        views, offset = [], 0
        for size in self._layer_bytes:
            views.append(area[:, offset:offset + size])
            offset += size
        return views

    def save(self, spec: SegmentSpec, block_ids: list[int], positions: list[int]) -> None:
        """Copy cache blocks `block_ids` into the segment at request positions `positions`."""
        if block_ids:
            with _mapped(spec) as mapped:
                self._copy(mapped, spec, block_ids, positions, into_segment=True)

    def load(self, spec: SegmentSpec, positions: list[int], block_ids: list[int]) -> None:
        """Copy segment positions `positions` into cache blocks `block_ids`."""
        if block_ids:
            with _mapped(spec) as mapped:
                self._copy(mapped, spec, block_ids, positions, into_segment=False)

    def _copy(self, mapped: mmap.mmap, spec: SegmentSpec, block_ids: list[int],
              positions: list[int], into_segment: bool) -> None:
        device = self._layers[0].device
        blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
        slots = torch.tensor(positions, dtype=torch.long)
        for layer, view in zip(self._layers, self._segment_views(mapped, spec)):
            if into_segment:
                data = layer.index_select(0, blocks).contiguous().view(len(block_ids), -1).view(torch.uint8)
                view[slots] = data.cpu()
            else:
                data = view[slots].to(device).view(layer.dtype).view(len(block_ids), *layer.shape[1:])
                layer.index_copy_(0, blocks, data)
