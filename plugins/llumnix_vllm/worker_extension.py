"""Methods Llumnix adds to vLLM's workers (`ParallelConfig.worker_extension_cls`), reached through
`collective_rpc`. They run between engine steps."""

from __future__ import annotations

from typing import Any

import torch

from llumnix_vllm.kv_transport import KvBlockIO, SegmentSpec, worker_rank


class LlumnixWorkerExtension:
    def llumnix_prepare_cpu_worker(self, num_threads: int) -> int:
        """Ready a CPU engine's worker for serving; returns its intra-op thread count.

        - Size the thread pool: vLLM's CPU worker disables `torch.set_num_threads` once threads
          are bound; with binding off (`nobind`) the pool defaults to every core, which starves
          the engine's own scheduler and the HTTP server on small hosts.
        - On CPUs with AMX, ask Linux for the AMX tile state. vLLM picks its AMX attention
          kernel there, but nothing in the worker requests the permission before that kernel
          first runs on a prefill with cached context (a prefix-cache hit, or a migrated
          request): the worker then dies of SIGILL.
        """
        torch._C.set_num_threads(num_threads)  # torch.set_num_threads itself is patched out
        if torch.cpu._is_amx_tile_supported() and not torch.cpu._init_amx():
            raise RuntimeError("this CPU has AMX, but Linux refused this process its tile state")
        return torch.get_num_threads()

    def llumnix_save_blocks(self, segment: dict[str, Any], block_ids: list[int], first_position: int) -> None:
        """Copy KV blocks `block_ids` (positions `first_position` on of one request) into
        `segment`; with tensor parallelism each rank copies its own shard. Which blocks hold
        computed KV is the engine's scheduler's to say (`LlumnixScheduler.llumnix_export_plan`):
        under async scheduling the workers' own token lists hold placeholders."""
        self._llumnix_block_io().save(SegmentSpec(**segment), block_ids, first_position)

    def llumnix_layer_block_bytes(self) -> list[int]:
        """This worker's bytes of one KV block per layer, in a segment's layer order."""
        return self._llumnix_block_io().layer_bytes

    def _llumnix_block_io(self) -> KvBlockIO:
        if getattr(self, "_llumnix_io", None) is None:
            runner = self.model_runner
            self._llumnix_io = KvBlockIO(runner.kv_caches, runner.kv_cache_config.num_blocks, worker_rank())
        return self._llumnix_io
