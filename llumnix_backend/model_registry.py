"""All models of a repository, their states, and the way requests find them.

A model folder that cannot be served (bad config, unknown backend, missing files, every engine
failing to start) is listed as UNAVAILABLE with the reason; it never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from llumnix_backend.config import ConfigError, load_model_config
from llumnix_backend.metrics import InstanceReport, ServerMetrics
from llumnix_backend.plugin import Backend, InstanceState, load_backend
from llumnix_backend.repository import is_valid_model_name, model_folders
from llumnix_backend.served_model import InstanceEvent, ProgressCallback, ServedModel

logger = logging.getLogger(__name__)


class ModelState(str, Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


class ModelNotFound(LookupError):
    pass


class ModelNotReady(RuntimeError):
    pass


@dataclass
class ModelEntry:
    name: str
    path: Path
    state: ModelState = ModelState.LOADING
    reason: str = ""
    model: ServedModel | None = None


def _ignore(_: InstanceEvent) -> None:
    pass


class ModelRegistry:
    def __init__(self, repository: Path, max_parallel_starts: int = 4, progress: ProgressCallback = _ignore) -> None:
        self.repository = repository
        self.metrics = ServerMetrics(self._reports, tuple(s.value for s in InstanceState))
        self._entries: dict[str, ModelEntry] = {}
        self._backends: dict[str, Backend] = {}
        self._start_slots = asyncio.Semaphore(max_parallel_starts)
        self._progress = progress
        self.initial_load_done = asyncio.Event()

    # --- loading ------------------------------------------------------------------------------

    async def load_repository(self) -> None:
        """Load every model folder concurrently; returns when each is READY or UNAVAILABLE."""
        folders = model_folders(self.repository)
        for name, path in folders.items():
            self._entries[name] = ModelEntry(name, path)
        await asyncio.gather(*(self._load(self._entries[name]) for name in folders))
        self.initial_load_done.set()

    async def _load(self, entry: ModelEntry) -> None:
        if not is_valid_model_name(entry.name):
            self._mark_unavailable(entry, f"{entry.path}: the folder name is not a valid model name "
                                          "(letters, digits, '.', '_' and '-', starting with a letter or digit)")
            return
        try:
            config = load_model_config(entry.path)
            backend = await self._backend(config.backend, entry.path / "config.yaml")
            runtime = await asyncio.to_thread(backend.load_model, entry.name, entry.path, config)
        except ConfigError as exc:
            self._mark_unavailable(entry, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a plugin bug must not stop other models
            logger.exception("loading model %s failed", entry.name)
            self._mark_unavailable(entry, f"{type(exc).__name__}: {exc}")
            return
        model = ServedModel(entry.name, config, runtime, self.metrics)
        entry.model = model
        await model.start(self._start_slots, self._progress)
        if model.ready:
            entry.state, entry.reason = ModelState.READY, ""
        else:
            reasons = "; ".join(f"instance {i}: {e}" for i, e in model.instance_errors().items())
            self._mark_unavailable(entry, f"no instance started ({reasons})")

    def _mark_unavailable(self, entry: ModelEntry, reason: str) -> None:
        entry.state, entry.reason = ModelState.UNAVAILABLE, reason
        logger.error("model %s is unavailable: %s", entry.name, reason)

    async def _backend(self, name: str, config_file: Path) -> Backend:
        if name not in self._backends:
            self._backends[name] = await asyncio.to_thread(load_backend, name, config_file)
        return self._backends[name]

    async def shutdown(self) -> None:
        models = [e.model for e in self._entries.values() if e.model is not None]
        for entry in self._entries.values():
            if entry.model is not None:
                entry.state = ModelState.UNLOADING
        await asyncio.gather(*(m.shutdown() for m in models))

    # --- lookup -------------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def entry(self, name: str) -> ModelEntry:
        if name not in self._entries:
            raise ModelNotFound(f"unknown model {name!r}")
        return self._entries[name]

    def get(self, name: str) -> ServedModel:
        """The model to send a request to; raises ModelNotFound or ModelNotReady."""
        entry = self.entry(name)
        if entry.state is not ModelState.READY or entry.model is None or not entry.model.ready:
            why = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(f"model {name!r} is not ready ({entry.state.value}{why})")
        return entry.model

    def ready_models(self) -> list[ServedModel]:
        return [e.model for e in self._entries.values() if e.state is ModelState.READY and e.model is not None]

    def _reports(self) -> list[InstanceReport]:
        return [r for e in self._entries.values() if e.model is not None for r in e.model.reports()]
