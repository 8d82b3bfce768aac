"""vLLM's repeated warnings, folded to one line each over the server and its engine processes.

Every engine process logs the same start-up warnings (the KV connector API is experimental, the
hybrid KV cache manager is off, ...), so a model of four instances shows each of them four times
or more. A filter on vLLM's log handler lets each distinct warning through once per server run:
the first process to log it creates a marker file named by its hash (atomically, `O_EXCL`); the
others find the marker and drop their copy.

vLLM configures logging in every process it starts, when the process first imports it, from the
file `VLLM_LOGGING_CONFIG_PATH` names. So `install` writes vLLM's own default configuration with
the filter added and points that variable at it, before any engine starts.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import logging
import logging.config
import os
import shutil
import tempfile


class FoldRepeatedWarnings(logging.Filter):
    """Passes a warning only the first time any process of this server logs it."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = hashlib.sha1(f"{record.name}\0{record.getMessage()}".encode()).hexdigest()
        try:
            os.close(os.open(os.path.join(self.directory, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        except OSError:
            return True  # (the markers are gone: the server is exiting) never lose a warning to this
        return True


def install() -> None:
    """Fold vLLM's warnings in this process and in every process started from now on, unless
    the operator configures vLLM's logging themselves."""
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return
    from vllm.logger import DEFAULT_LOGGING_CONFIG  # (as vLLM built it from the environment)

    directory = tempfile.mkdtemp(prefix="llumnix-vllm-logging-")
    atexit.register(shutil.rmtree, directory, True)
    markers = os.path.join(directory, "seen")
    os.mkdir(markers)
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["filters"] = {"fold_repeats": {"()": f"{__name__}.FoldRepeatedWarnings", "directory": markers}}
    config["handlers"]["vllm"]["filters"] = ["fold_repeats"]
    path = os.path.join(directory, "logging.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(config, file)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
    logging.config.dictConfig(config)
