"""Methods Llumnix adds to vLLM's workers (`ParallelConfig.worker_extension_cls`), reached from
the front end through `AsyncLLM.collective_rpc`. They run between engine steps, when no forward
pass is touching the KV cache."""

from __future__ import annotations

from typing import Any

import torch

from llumnix_vllm.kv_transport import KvBlockIO, SegmentSpec, worker_rank

# vLLM appends "-" and 8 random characters to the id the front end gave a request.
_INTERNAL_ID_SUFFIX_LEN = 9


def external_request_id(internal_id: str) -> str:
    if len(internal_id) > _INTERNAL_ID_SUFFIX_LEN and internal_id[-_INTERNAL_ID_SUFFIX_LEN] == "-":
        return internal_id[:-_INTERNAL_ID_SUFFIX_LEN]
    return internal_id


def agreed_export(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The one answer of `llumnix_export_kv` from every worker of an engine: with tensor
    parallelism each rank copies its own shard, and all must have copied the same blocks."""
    first = answers[0]
    if any(answer != first for answer in answers[1:]):
        raise RuntimeError(f"the engine's workers exported different KV for one request: {answers}")
    return first


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

    def llumnix_export_kv(self, request_id: str, first_block: int, segment: dict[str, Any],
                          include_partial: bool, max_blocks: int | None = None,
                          running: bool = False) -> dict[str, Any]:
        """Copy a decoding request's KV blocks, from position `first_block` on, into `segment`.

        Copies full blocks only, or also the last partial one with `include_partial`; at most
        `max_blocks` (the engine does not step while this runs). Returns
        the request's tokens (prompt + generated: all but the last have their KV copied) and
        how many block positions the segment now holds; or, under "not_exported", why the
        request is not decoding here now. `running`: the engine's scheduler has checked that
        the request runs (is not preempted), so its block table is current even if the last
        step left it out.
        """
        spec = SegmentSpec(**segment)  # plain data on the wire
        runner = self.model_runner
        internal = next((r for r in runner.requests if external_request_id(r) == request_id), None)
        if internal is None:
            return {"not_exported": "the engine's workers do not hold it (it finished or was aborted)"}
        # The workers keep a preempted request's state, block table included, though its blocks
        # are gone: unless the scheduler vouches for it, only one scheduled in the last step counts.
        if not running and internal not in runner.input_batch.req_id_to_index:
            return {"not_exported": "the engine did not schedule it in its last step"}
        state = runner.requests[internal]
        if not state.output_token_ids:
            return {"not_exported": "it is in prefill"}
        tokens = list(state.prompt_token_ids) + list(state.output_token_ids)
        with_kv = len(tokens) - 1  # the newest token is sampled but not yet computed
        block_size = self.vllm_config.cache_config.block_size
        end = -(-with_kv // block_size) if include_partial else with_kv // block_size
        if max_blocks is not None:
            end = min(end, first_block + max_blocks)
        if end > spec.capacity_blocks:
            raise ValueError(f"request {request_id} needs {end} blocks, the segment holds {spec.capacity_blocks}")
        self._llumnix_block_io().save(spec, list(state.block_ids[0][first_block:end]), first_block)
        return {"token_ids": tokens, "blocks": end}

    def _llumnix_block_io(self) -> KvBlockIO:
        if getattr(self, "_llumnix_io", None) is None:
            runner = self.model_runner
            self._llumnix_io = KvBlockIO(runner.kv_caches, runner.kv_cache_config.num_blocks, worker_rank())
        return self._llumnix_io
