"""Moving KV-cache blocks between engine processes on one host.

A `TransferSegment` is the area one migration's blocks travel through. The source's worker
copies blocks of the request into it, by their position in the request (block 0 holds tokens
0..block_size-1, ...); the destination's worker copies them out into the blocks its scheduler
allocated. Blocks travel as opaque bytes, layer by layer, so any KV layout works as long as
both engines run the same model, dtype, block size and layout. The segment is layer-major (all
positions of layer 0, then layer 1, ...), so a run of consecutive positions of one layer is one
contiguous range: one copy per layer, straight between the cache and the segment.

Two paths, chosen per segment:
- host: the segment is shared memory (a tmpfs file) the front end creates; works everywhere;
- device (CUDA): the source's worker keeps the segment in GPU memory and shares it through
  CUDA IPC; the front end's file then only carries the IPC handle. Blocks go GPU to GPU
  (over NVLink/PCIe peer access when the instances sit on different GPUs) and never touch
  host memory. The source frees its GPU area once the front end has removed the file.
Between hosts (Ray nodes, `ray_cluster`) each side has a host segment of its own, and the runs of
positions copied so far travel from one to the other as bytes (`read_positions`, `write_positions`).

A tensor-parallel engine keeps a shard of every block on each of its workers (ranks). Its
segment is one area per rank, and rank r of the source fills the area that rank r of the
destination reads, so migration needs both engines to have the same layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import pickle
import tempfile
import uuid
from collections.abc import Iterator, Sequence
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
    block_bytes: int  # one rank's share of a block, every layer
    on_device: bool = False  # the device path: `path` holds a CUDA IPC handle, not the blocks
    ranks: int = 1  # one area per worker of a tensor/pipeline-parallel engine

    def rank_path(self, rank: int) -> str:
        return self.path if self.ranks == 1 else f"{self.path}.rank{rank}"

    def of_rank(self, rank: int) -> SegmentSpec:
        """The area rank `rank` fills (at the source) or reads (at the destination)."""
        if not 0 <= rank < self.ranks:
            raise ValueError(f"the segment has areas for {self.ranks} rank(s); this worker is rank {rank}: "
                             "the two engines' tensor/pipeline-parallel layouts differ")
        return dataclasses.replace(self, path=self.rank_path(rank), ranks=1)


class TransferSegment:
    """The front end's handle: creates the shared memory and removes it when closed."""

    def __init__(self, capacity_blocks: int, block_bytes: int, on_device: bool = False, ranks: int = 1) -> None:
        path = os.path.join(SEGMENT_DIR, f"llumnix-kv-{uuid.uuid4().hex[:16]}")
        self.spec = SegmentSpec(path, capacity_blocks, block_bytes, on_device, ranks)
        for rank in range(ranks):
            with open(self.spec.rank_path(rank), "wb") as f:
                if not on_device:
                    f.truncate(max(1, capacity_blocks * block_bytes))

    def close(self) -> None:
        for rank in range(self.spec.ranks):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.rank_path(rank))


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


def _layer_runs(layer_bytes: Sequence[int], capacity_blocks: int, first: int, end: int) -> list[slice]:
    """The byte ranges of positions [first, end) in a layer-major area, one per layer."""
    runs, offset = [], 0
    for size in layer_bytes:
        runs.append(slice(offset + first * size, offset + end * size))
        offset += capacity_blocks * size
    return runs


def read_positions(spec: SegmentSpec, layer_bytes: Sequence[int], first: int, end: int) -> list[bytes]:
    """Positions [first, end) of a host segment, one bytes object per rank's area (layer after
    layer); `layer_bytes`: one rank's bytes of a block, per layer, in the segment's order."""
    if spec.on_device:
        raise ValueError("only a host segment can be read in the front end")
    out = []
    for rank in range(spec.ranks):
        with _mapped(spec.of_rank(rank)) as area:
            out.append(b"".join(area[run] for run in _layer_runs(layer_bytes, spec.capacity_blocks, first, end)))
    return out


def write_positions(spec: SegmentSpec, layer_bytes: Sequence[int], first: int, data: Sequence[bytes]) -> None:
    """Put what `read_positions` read (of positions `first` on) into another host segment."""
    for rank, chunk in enumerate(data):
        end = first + len(chunk) // sum(layer_bytes)
        with _mapped(spec.of_rank(rank)) as area:
            taken = 0
            for run in _layer_runs(layer_bytes, spec.capacity_blocks, first, end):
                size = run.stop - run.start
                area[run] = chunk[taken:taken + size]
                taken += size


def worker_rank() -> int:
    """The calling worker's rank in its engine (0 without tensor or pipeline parallelism)."""
    from vllm.distributed.parallel_state import get_world_group

    return get_world_group().rank_in_group


class KvBlockIO:
    """Copies whole KV blocks between a worker's cache tensors and a transfer segment."""

    def __init__(self, kv_caches: list[torch.Tensor], num_blocks: int, rank: int = 0) -> None:
        self.rank = rank  # this worker's rank in its engine
        seen: set[int] = set()
        self._layers: list[torch.Tensor] = []
        for tensor in kv_caches:
            if tensor is None or tensor.data_ptr() in seen:
                continue  # layers sharing one cache are moved once
            seen.add(tensor.data_ptr())
            block_dim = next(d for d, size in enumerate(tensor.shape) if size == num_blocks)
            self._layers.append(tensor.movedim(block_dim, 0))  # [num_blocks, ...] in every layout
        # One block's bytes per layer, in the segment's layer order.
        self.layer_bytes = [layer[0].numel() * layer.element_size() for layer in self._layers]
        self.block_bytes = sum(self.layer_bytes)

    def _split(self, area: torch.Tensor, spec: SegmentSpec) -> list[torch.Tensor]:
        """A segment's bytes, cut into one [capacity, layer block bytes] view per layer."""
        if spec.block_bytes != self.block_bytes:
            raise ValueError(f"segment blocks are {spec.block_bytes} bytes, this engine's are {self.block_bytes}")
        views, offset = [], 0
        for size in self.layer_bytes:
            views.append(area[offset:offset + spec.capacity_blocks * size].view(spec.capacity_blocks, size))
            offset += spec.capacity_blocks * size
        return views

    def save(self, spec: SegmentSpec, block_ids: list[int], first_position: int) -> None:
        """Copy cache blocks `block_ids` into the segment at request positions `first_position` on."""
        if block_ids:
            with self._area(spec, owner=True) as area:
                self._copy(area, spec, block_ids, first_position, into_segment=True)

    def load(self, spec: SegmentSpec, first_position: int, block_ids: list[int]) -> None:
        """Copy the segment's positions from `first_position` on into cache blocks `block_ids`."""
        if block_ids:
            with self._area(spec, owner=False) as area:
                self._copy(area, spec, block_ids, first_position, into_segment=False)

    @contextlib.contextmanager
    def _area(self, spec: SegmentSpec, owner: bool) -> Iterator[torch.Tensor]:
        spec = spec.of_rank(self.rank)
        if spec.on_device:
            yield _device_area(spec, self._layers[0].device, owner)
        else:
            with _mapped(spec) as mapped:
                yield torch.frombuffer(mapped, dtype=torch.uint8, count=spec.capacity_blocks * spec.block_bytes)

    def _copy(self, area: torch.Tensor, spec: SegmentSpec, block_ids: list[int],
              first_position: int, into_segment: bool) -> None:
        device = self._layers[0].device
        count = len(block_ids)
        blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
        for layer, view in zip(self._layers, self._split(area, spec)):
            run = view[first_position:first_position + count]  # contiguous: the layout is layer-major
            if into_segment:
                run.copy_(layer.index_select(0, blocks).view(count, -1).view(torch.uint8))
            else:
                layer.index_copy_(0, blocks, run.to(device).view(layer.dtype).view(count, *layer.shape[1:]))
        if into_segment and area.is_cuda:
            # The destination reads the area from another process as soon as this returns.
            torch.cuda.current_stream(area.device).synchronize()


# Device segments this worker process holds: the ones it owns (it allocated them, as a
# migration's source) and the ones it opened through CUDA IPC (as a destination), by path.
_owned_areas: dict[str, torch.Tensor] = {}
_opened_areas: dict[str, torch.Tensor] = {}


def _device_area(spec: SegmentSpec, device: torch.device, owner: bool) -> torch.Tensor:
    # A segment whose file the front end removed belongs to a finished migration: let it go.
    for areas in (_owned_areas, _opened_areas):
        for path in [p for p in areas if not os.path.exists(p)]:
            del areas[path]
    if owner:
        if spec.path not in _owned_areas:
            from torch.multiprocessing.reductions import reduce_tensor

            area = torch.empty(spec.capacity_blocks * spec.block_bytes, dtype=torch.uint8, device=device)
            with open(spec.path, "wb") as f:
                pickle.dump(reduce_tensor(area), f)
            _owned_areas[spec.path] = area
        return _owned_areas[spec.path]
    if spec.path not in _opened_areas:
        with open(spec.path, "rb") as f:
            rebuild, args = pickle.load(f)  # written by the source's worker, see above
        _opened_areas[spec.path] = rebuild(*args)
    return _opened_areas[spec.path]
