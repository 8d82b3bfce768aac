"""Why an engine failed to start, told to the front end that started it.

When an engine process fails while it starts (say its KV cache cannot hold one sequence of
`max_model_len`), vLLM logs the cause in that process and the front end only gets "Engine core
initialization failed. See root cause above." This module is a vLLM general plugin
(`vllm.general_plugins` entry point), which vLLM loads in every engine process as the engine
core starts. It watches vLLM's engine-core logger for the failure and writes the exception's
message to a file named by the instance's token (`VllmConfig.instance_id`, found among the
failing frames' locals), where the front end reads it (`start_error`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback

from llumnix_vllm.kv_transport import SEGMENT_DIR
from llumnix_vllm.snapshot_channel import is_instance_token

ENGINE_CORE_LOGGER = "vllm.v1.engine.core"
FAILED_TO_START = "EngineCore failed to start."


def _error_file(token: str) -> str:
    return os.path.join(SEGMENT_DIR, f"llumnix-engine-error-{token}")


class _StartFailureReporter(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() != FAILED_TO_START or not record.exc_info or record.exc_info[1] is None:
            return
        error, tb = record.exc_info[1], record.exc_info[2]
        for frame, _ in traceback.walk_tb(tb):
            token = getattr(frame.f_locals.get("vllm_config"), "instance_id", None)
            if isinstance(token, str) and is_instance_token(token):
                with contextlib.suppress(OSError), open(_error_file(token), "w") as f:
                    f.write(f"{type(error).__name__}: {error}")
                return


def install() -> None:
    """The plugin's entry point; vLLM may call it several times in one process."""
    logger = logging.getLogger(ENGINE_CORE_LOGGER)
    if not any(isinstance(h, _StartFailureReporter) for h in logger.handlers):
        logger.addHandler(_StartFailureReporter(logging.ERROR))


def start_error(token: str) -> str | None:
    """The start failure the engine of `token` reported, if any (read once)."""
    path = _error_file(token)
    try:
        with open(path) as f:
            message = f.read().strip()
    except OSError:
        return None
    with contextlib.suppress(OSError):
        os.unlink(path)
    return message or None
