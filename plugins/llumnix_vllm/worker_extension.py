"""Methods Llumnix adds to vLLM's workers (`ParallelConfig.worker_extension_cls`), reached from
the front end through `AsyncLLM.collective_rpc`."""

from __future__ import annotations

import torch


class LlumnixWorkerExtension:
    def llumnix_set_cpu_threads(self, num_threads: int) -> int:
        """Size the worker's intra-op thread pool (CPU engines). vLLM's CPU worker disables
        `torch.set_num_threads` once threads are bound; with binding off (`nobind`) the pool
        defaults to every core, which starves the engine's own scheduler and the HTTP server
        on small hosts. Returns the size now in effect."""
        torch._C.set_num_threads(num_threads)  # torch.set_num_threads itself is patched out
        return torch.get_num_threads()
