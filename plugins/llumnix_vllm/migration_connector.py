"""The KV connector that lets a destination engine admit a migrated request without recomputing it.

vLLM loads it by module path (`kv_transfer_config.kv_connector_module_path`). A request that
carries `kv_transfer_params = {"llumnix_segment": ...}` brings its KV cache in a transfer
segment (see `kv_transport`): its prompt is the original prompt plus every token generated so
far, and all of those tokens but the last already have their KV in the segment. The connector
tells the scheduler so (a synchronous load), records which blocks the scheduler allocated for
them, and the worker copies the blocks in before the step's forward pass. Tokens the local
prefix cache already holds (earlier stages of the same migration) are not copied again. A
migrated request that is preempted here later is recomputed like any other. Every other
request passes through untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from llumnix_vllm.kv_transport import KvBlockIO, SegmentSpec, worker_rank

SEGMENT_PARAM = "llumnix_segment"


@dataclass(frozen=True)
class BlockLoad:
    segment: SegmentSpec
    first_position: int  # of the blocks within the request, as the segment holds them
    block_ids: list[int]  # where they go in this engine's cache, from that position on


@dataclass
class MigrationLoadMetadata(KVConnectorMetadata):
    loads: list[BlockLoad] = field(default_factory=list)


def segment_params(spec: SegmentSpec) -> dict[str, Any]:
    """The `kv_transfer_params` that make a request load its KV from `spec`."""
    return {SEGMENT_PARAM: dataclasses.asdict(spec)}


def _segment_of(request: Any) -> SegmentSpec | None:
    """The segment a request's KV comes from, only while it has generated nothing here: once a
    migrated request has run on this engine and is then preempted, its recomputation must not
    load again (the segment is gone, and it never held the tokens generated since)."""
    params = getattr(request, "kv_transfer_params", None) or {}
    spec = params.get(SEGMENT_PARAM)
    return SegmentSpec(**spec) if spec and request.num_output_tokens == 0 else None


class LlumnixMigrationConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else None
        self._pending: list[BlockLoad] = []  # scheduler side, until the next step's metadata
        self._io: KvBlockIO | None = None  # worker side

    # --- scheduler side -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        if _segment_of(request) is None:
            return 0, False
        # Every token but the last has its KV in the segment; the last one is computed here,
        # which also samples the next token. (A synchronous load must leave one to compute.)
        return max(0, request.num_tokens - 1 - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        spec = _segment_of(request)
        if spec is None or num_external_tokens == 0:
            return
        loaded_end = request.num_tokens - 1
        first = (loaded_end - num_external_tokens) // self._block_size
        last = -(-loaded_end // self._block_size)  # the block holding the last loaded token
        block_ids = blocks.get_block_ids()[0]
        self._pending.append(BlockLoad(spec, first, block_ids[first:last]))

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        metadata, self._pending = MigrationLoadMetadata(self._pending), []
        return metadata

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    @property
    def requires_kv_delivery(self) -> bool:
        # Nothing is handed off when a request ends (a migration copies a running request), so
        # a preempted request keeps its in-flight output, as without a connector. (vLLM 0.32
        # asks; its default for a `kv_both` connector would drop that output and recompute.)
        return False

    # --- worker side --------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._io = KvBlockIO(list(kv_caches.values()), self._num_blocks, worker_rank())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        if not isinstance(metadata, MigrationLoadMetadata) or self._io is None:
            return
        for load in metadata.loads:
            self._io.load(load.segment, load.first_position, load.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        pass
