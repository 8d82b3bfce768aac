"""All models of a repository, their states, and the way requests find them.

A model folder that cannot be served (bad config, unknown backend, missing files, every engine
failing to start) is listed as UNAVAILABLE with the reason; it never stops the others.

Model control follows Triton: with `none`, every folder is loaded at start and stays as it is;
with `poll`, the same, and then the registry follows the folder: a new model folder is loaded,
a changed one reloaded, a removed one unloaded; with `explicit`, only the models named at start
are loaded, and `load_model`/`unload_model` (the repository API) do the rest. Reloading a model
that serves applies a change confined to its scheduler settings and instance count in place
(surplus instances are drained by migration, then stopped). A change of engine settings starts
new engines beside the old ones and switches traffic once they serve; if the new engines can
take over the old ones' requests (same KV layout), those migrate to them, else the old version
finishes them. If the new one cannot be served, the old one keeps serving and the model's
reason says why. Unloading stops new
requests, lets the running ones finish, then stops the instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NoReturn

from llumnix_backend.config import ConfigError, ModelConfig, ModelSource, parse_model_config
from llumnix_backend.errors import Refusal, Refused
from llumnix_backend.gpus import GpuInventory
from llumnix_backend.metrics import InstanceReport, ServerMetrics
from llumnix_backend.plugin import Backend, InstanceState, ModelRuntime, load_backend
from llumnix_backend.repository import is_valid_model_name, load_model_source, model_folders
from llumnix_backend.repository_watcher import RepositoryWatcher
from llumnix_backend.served_model import InstanceEvent, InstanceStarts, ProgressCallback, ServedModel

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


class ModelControlMode(str, Enum):
    NONE = "none"  # the repository as found at start, fixed
    POLL = "poll"  # follow the repository folder as it changes
    EXPLICIT = "explicit"  # models load and unload on request


class RepositoryRequestError(Refused):
    """A load or unload request that cannot be carried out."""


NOT_LOADED = "not loaded"
UNLOADED = "unloaded"


@dataclass
class ModelEntry:
    name: str
    path: Path
    state: ModelState = ModelState.LOADING
    reason: str = ""
    model: ServedModel | None = None

    @property
    def serving_state(self) -> ModelState:
        """The state clients see: a loaded model none of whose instances serves (all failed,
        say, and restarting) is UNAVAILABLE until one serves again."""
        if self.state is ModelState.READY and self.model is not None and not self.model.ready:
            return ModelState.UNAVAILABLE
        return self.state

    @property
    def serving_reason(self) -> str:
        if self.serving_state is not self.state and self.model is not None:
            return self.model.unavailable_reason()
        return self.reason


def _ignore(_: InstanceEvent) -> None:
    pass


class ModelRegistry:
    def __init__(self, repository: Path, max_parallel_starts: int = 4, progress: ProgressCallback = _ignore,
                 control_mode: ModelControlMode = ModelControlMode.NONE,
                 startup_models: frozenset[str] = frozenset({"*"}), quiet_s: float = 0.5,
                 cluster_address: str | None = None, start_progress_every_s: float = 15.0) -> None:
        """`startup_models`: in explicit mode, the models to load at start (`*`: all).
        `quiet_s`: in poll mode, how long a model folder must stay unchanged to be acted on.
        `cluster_address`: the Ray cluster the backends place instances on (None: this host).
        `start_progress_every_s`: how often `progress` hears of an instance still starting."""
        self.repository = repository
        self._cluster_address = cluster_address
        self.control_mode = control_mode
        self._quiet_s = quiet_s
        self._startup_models = startup_models
        self._operations: dict[str, asyncio.Lock] = {}  # one load/unload at a time per model
        self._retiring: dict[asyncio.Task, ServedModel] = {}  # replaced versions finishing their requests
        self._watcher: RepositoryWatcher | None = None
        self.metrics = ServerMetrics(self._reports, tuple(s.value for s in InstanceState),
                                     lambda: [(e.name, e.serving_state.value) for e in self._entries.values()],
                                     tuple(s.value for s in ModelState))
        self._entries: dict[str, ModelEntry] = {}
        self._backends: dict[str, Backend] = {}
        self.gpus = GpuInventory()  # the host's, as the first backend loaded sees them
        self._starts = InstanceStarts(asyncio.Semaphore(max_parallel_starts), progress, start_progress_every_s)
        self.initial_load_done = asyncio.Event()
        self.loaded_at_start: frozenset[str] = frozenset()  # the models the server was to serve from the start
        self.stopping = False  # `begin_shutdown` was called

    # --- loading ------------------------------------------------------------------------------

    async def load_repository(self) -> None:
        """Load the models to serve from the start, concurrently; returns when each is READY or
        UNAVAILABLE. In explicit mode the other folders are listed as not loaded; in poll mode
        the repository is watched from here on."""
        if self.control_mode is ModelControlMode.POLL:
            self._watcher = RepositoryWatcher(self.repository, self.follow_folder, self._quiet_s)
            self._watcher.start()  # before the scan: nothing changed during loading is missed
        folders = model_folders(self.repository)
        for name, path in folders.items():
            self._entries[name] = ModelEntry(name, path)
        explicit = self.control_mode is ModelControlMode.EXPLICIT and "*" not in self._startup_models
        for missing in sorted(self._startup_models - {"*"} - set(folders)):
            reason = f"--load-model {missing}: no such model folder in {self.repository}"
            if is_valid_model_name(missing):  # listed, so that the index says why it is not served
                self._entries[missing] = ModelEntry(missing, self.repository / missing, ModelState.UNAVAILABLE, reason)
            logger.error("%s", reason)
        to_load = [name for name in folders if not explicit or name in self._startup_models]
        for name in set(folders) - set(to_load):
            self._entries[name].state, self._entries[name].reason = ModelState.UNAVAILABLE, NOT_LOADED
        self.loaded_at_start = frozenset(to_load)
        await self._preload_default_backend()
        await asyncio.gather(*(self._load(self._entries[name]) for name in to_load))
        self.initial_load_done.set()

    async def _preload_default_backend(self) -> None:
        """Import the default backend now (vLLM's takes seconds), so that a model folder
        dropped into the repository later does not wait for it."""
        name = ModelConfig.model_fields["backend"].default
        try:
            await self._backend(name, "the default backend")
        except ConfigError as exc:  # a model naming it will say so
            logger.warning("%s", exc)

    async def _load(self, entry: ModelEntry) -> None:
        async with self._operations.setdefault(entry.name, asyncio.Lock()):
            model, reason = await self._start_model(entry)
            self._count(entry.name, "load", model is not None)
            if model is not None:
                entry.model, entry.state, entry.reason = model, ModelState.READY, ""
            else:
                self._mark_unavailable(entry, reason)

    def _read_config(self, entry: ModelEntry, config_override: dict | None) -> ModelSource:
        """The model's settings: its folder's, or `config_override`; raises ConfigError."""
        if not is_valid_model_name(entry.name):
            raise ConfigError(entry.path, None, "the folder name is not a valid model name "
                                                "(letters, digits, '.', '_' and '-', starting with a letter or digit)")
        if config_override is not None:
            where = "load request: parameters.config"
            return ModelSource(parse_model_config(config_override, where), where, where, entry.path)
        return load_model_source(entry.path, len(self.gpus.devices))

    async def _load_runtime(self, entry: ModelEntry, source: ModelSource) -> tuple[ModelRuntime | None, str]:
        """The backend's view of the model (engine settings checked, tokenizer loaded), or None
        and why."""
        try:
            backend = await self._backend(source.config.backend, source.config_file)
            return await asyncio.to_thread(backend.load_model, entry.name, source), ""
        except ConfigError as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a plugin bug must not stop other models
            logger.exception("loading model %s failed", entry.name)
            return None, f"{type(exc).__name__}: {exc}"

    async def _start_model(self, entry: ModelEntry, source: ModelSource | None = None,
                           runtime: ModelRuntime | None = None) -> tuple[ServedModel | None, str]:
        """Start a version of the model from `source` (read from its folder if None): the model
        once it serves, else None and why."""
        try:
            source = source or self._read_config(entry, None)
        except ConfigError as exc:
            return None, str(exc)
        if runtime is None:
            runtime, reason = await self._load_runtime(entry, source)
            if runtime is None:
                return None, reason
        began = time.monotonic()
        model = ServedModel(entry.name, source, runtime, self.metrics, self.gpus)
        await model.start(self._starts)
        if model.ready:
            self.metrics.model_load_duration.labels(entry.name).observe(time.monotonic() - began)
            return model, ""
        reasons = "; ".join(f"instance {i}: {e}" for i, e in model.instance_errors().items())
        await model.shutdown()
        return None, f"no instance started ({reasons})"

    # --- repository API (explicit model control) ----------------------------------------------

    def _check_explicit(self, name: str) -> None:
        if self.control_mode is not ModelControlMode.EXPLICIT:
            raise RepositoryRequestError(
                Refusal.INVALID, f"models cannot be loaded or unloaded: the server runs with --model-control-mode "
                                 f"{self.control_mode.value} (start it with explicit)")
        if not is_valid_model_name(name):
            raise RepositoryRequestError(
                Refusal.INVALID, f"invalid model name {name!r}: a model name is a plain folder name (letters, "
                                 "digits, '.', '_' and '-', starting with a letter or digit)")

    async def load_model(self, name: str, config_override: dict | None = None) -> None:
        """Load (or reload) `name` from its folder, or with `config_override` as its config.
        A version that serves keeps serving until the new one does; if the new one cannot be
        served it keeps serving for good, and the error is raised and shown as the reason."""
        self._check_explicit(name)
        async with self._operations.setdefault(name, asyncio.Lock()):
            entry = self._entry_or_new(name)  # under the lock, so one entry per model
            if config_override is None and not entry.path.is_dir():
                raise RepositoryRequestError(Refusal.INVALID, f"failed to load {name!r}: no folder {entry.path}")
            self._entries[name] = entry
            await self._apply_load(entry, config_override)

    def _entry_or_new(self, name: str) -> ModelEntry:
        """The model's entry; for a model the index does not list, a new one, not yet listed."""
        return self._entries.get(name) or ModelEntry(name, self.repository / name, ModelState.UNAVAILABLE, NOT_LOADED)

    async def follow_folder(self, name: str) -> None:
        """Poll mode: bring model `name` in line with its folder, which has just settled after
        a change: load or reload it if the folder is there, unload it if not."""
        async with self._operations.setdefault(name, asyncio.Lock()):
            entry = self._entry_or_new(name)
            if entry.path.is_dir():
                self._entries[name] = entry
                with contextlib.suppress(RepositoryRequestError):  # the model's state says why
                    await self._apply_load(entry, None)
            elif name in self._entries:
                await self._apply_unload(entry)
                del self._entries[name]  # gone from the folder, gone from the index

    async def _apply_load(self, entry: ModelEntry, config_override: dict | None) -> None:
        """Load or reload under the model's lock; raises RepositoryRequestError if it fails."""
        name = entry.name
        previous = entry.model if entry.state is ModelState.READY else None
        operation = "load" if previous is None else "reload"
        try:
            source = self._read_config(entry, config_override)
        except ConfigError as exc:
            self._refuse_load(entry, operation, str(exc))
        if previous is not None and previous.source == source:
            entry.reason = ""  # nothing to do (a file was touched, or a failed edit undone)
            return
        if previous is not None and previous.source.same_engine(source):
            try:  # (what load_model checks besides the engines)
                backend = await self._backend(source.config.backend, source.config_file)
                backend.check_frontend(source)
            except ConfigError as exc:
                self._refuse_load(entry, operation, str(exc))
            entry.reason = ""
            await previous.reconfigure(source, self._starts)
            self._count(name, operation, True)
            return
        if previous is None:
            entry.state, entry.reason = ModelState.LOADING, ""
        runtime, reason = await self._load_runtime(entry, source)
        if runtime is None:
            self._refuse_load(entry, operation, reason)
        if previous is not None and runtime.can_take_over_from(previous.runtime):
            began = time.monotonic()
            reason = await previous.replace_engines(source, runtime, self._starts)
            if reason:
                self._refuse_load(entry, operation, reason)
            self.metrics.model_load_duration.labels(name).observe(time.monotonic() - began)
            self._count(name, operation, True)
            entry.reason = ""
            return
        model, reason = await self._start_model(entry, source, runtime)
        if model is None:
            self._refuse_load(entry, operation, reason)
        self._count(name, operation, True)
        entry.model, entry.state, entry.reason = model, ModelState.READY, ""
        if previous is not None:
            task = asyncio.create_task(self._retire(previous), name=f"retire-{name}")
            self._retiring[task] = previous
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    def _refuse_load(self, entry: ModelEntry, operation: str, reason: str) -> NoReturn:
        """A load or reload failed: the model stays as it was (unavailable, or serving its
        previous version with the failure as its reason)."""
        self._count(entry.name, operation, False)
        if entry.model is None:
            self._mark_unavailable(entry, reason)
        else:
            entry.reason = f"the new version failed to load; the previous one keeps serving: {reason}"
            logger.error("model %s: %s", entry.name, entry.reason)
        raise RepositoryRequestError(Refusal.INVALID, f"failed to load {entry.name!r}: {reason}")

    async def unload_model(self, name: str) -> None:
        """Stop taking requests for `name`, let the running ones finish, then stop its instances."""
        self._check_explicit(name)
        async with self._operations.setdefault(name, asyncio.Lock()):
            if name in self._entries:  # a model never listed has nothing to unload
                await self._apply_unload(self._entries[name])

    async def _apply_unload(self, entry: ModelEntry) -> None:
        model = entry.model
        if model is None:
            return  # not loaded: nothing to do, as in Triton
        entry.state, entry.reason = ModelState.UNLOADING, ""
        await self._retire(model)
        entry.model, entry.state, entry.reason = None, ModelState.UNAVAILABLE, UNLOADED
        self._count(entry.name, "unload", True)

    def _count(self, name: str, operation: str, succeeded: bool) -> None:
        self.metrics.model_operations.labels(name, operation, "success" if succeeded else "failure").inc()

    @staticmethod
    async def _retire(model: ServedModel) -> None:
        await model.wait_idle()
        await model.shutdown()

    def _mark_unavailable(self, entry: ModelEntry, reason: str) -> None:
        entry.state, entry.reason = ModelState.UNAVAILABLE, reason
        logger.error("model %s is unavailable: %s", entry.name, reason)

    def engine_version(self, backend: str) -> str | None:
        """The version of the engine that `backend` runs, once that backend is loaded."""
        loaded = self._backends.get(backend)
        return None if loaded is None else loaded.engine_version

    async def _backend(self, name: str, config_file: str) -> Backend:
        if name not in self._backends:
            backend = await asyncio.to_thread(load_backend, name, config_file)
            if self._cluster_address is not None:
                await asyncio.to_thread(backend.use_cluster, self._cluster_address)
            self._backends[name] = backend
            if not self.gpus.devices:
                self.gpus.devices = await asyncio.to_thread(backend.visible_gpus)
                if self.gpus.devices:
                    logger.info("GPUs: %s", ", ".join(f"{d.index} ({d.name}, {d.memory_bytes / 2**30:.0f} GiB)"
                                                      for d in self.gpus.devices))
        return self._backends[name]

    def begin_shutdown(self, grace_s: float) -> None:
        """The server is stopping: no model takes new requests (nor is ready), and requests still
        running after `grace_s` end with `ShuttingDown`. `shutdown` then stops the engines."""
        self.stopping = True
        for model in [*self._retiring.values(), *(e.model for e in self._entries.values() if e.model is not None)]:
            model.begin_shutdown(grace_s)

    async def shutdown(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
        retiring = list(self._retiring.values())
        for task in list(self._retiring):
            task.cancel()
        models = retiring + [e.model for e in self._entries.values() if e.model is not None]
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
        if entry.serving_state is not ModelState.READY or entry.model is None:
            why = f": {entry.serving_reason}" if entry.serving_reason else ""
            raise ModelNotReady(f"model {name!r} is not ready ({entry.serving_state.value}{why})")
        return entry.model

    def loaded(self, name: str) -> ServedModel:
        """The model as loaded, whether or not an instance serves now (for its metadata and
        the operations on its instances); raises ModelNotFound or ModelNotReady."""
        entry = self.entry(name)
        if entry.state is not ModelState.READY or entry.model is None:
            why = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(f"model {name!r} is not loaded ({entry.state.value}{why})")
        return entry.model

    @property
    def ready(self) -> bool:
        """Whether the server is ready: loading at start is over, it is not stopping, and one of
        the models to serve from the start serves (a server started with none, an empty
        repository to drop folders into, is ready at once)."""
        return self.initial_load_done.is_set() and not self.stopping and (
            bool(self.ready_models()) or not self.loaded_at_start)

    def ready_models(self) -> list[ServedModel]:
        return [e.model for e in self._entries.values() if e.serving_state is ModelState.READY and e.model is not None]

    def _reports(self) -> list[InstanceReport]:
        return [r for e in self._entries.values() if e.model is not None for r in e.model.reports()]
