"""Following the repository folder as it changes (Triton's `poll` model control).

watchdog reports file events from its own thread; each is mapped to the model folder it
touches and handed to the event loop. A model is acted on once its folder has been quiet for
`quiet_s` seconds, so that a folder still being copied, or a config an editor is saving in
several steps, is never loaded half-written. Editors' temporary and hidden files are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

logger = logging.getLogger(__name__)

_TEMPORARY_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".part", ".crdownload")


def model_of(path: str | Path, repository: Path) -> str | None:
    """The model folder a changed path belongs to, or None for paths that do not count (the
    repository itself, hidden or temporary files, anything outside)."""
    try:
        parts = Path(path).relative_to(repository).parts
    except ValueError:
        return None
    if not parts or any(p.startswith((".", "_")) or p.endswith(_TEMPORARY_SUFFIXES) for p in parts):
        return None
    return parts[0]


class RepositoryWatcher:
    def __init__(self, repository: Path, on_settled: Callable[[str], Awaitable[None]], quiet_s: float) -> None:
        self.repository = repository
        self._on_settled = on_settled
        self._quiet_s = quiet_s
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._observer: Observer | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return  # reads change nothing
                for path in (event.src_path, getattr(event, "dest_path", "")):
                    if path and (name := model_of(path, watcher.repository)) is not None:
                        loop.call_soon_threadsafe(watcher._touched, name)

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.repository), recursive=True)
        self._observer.start()

    def _touched(self, name: str) -> None:
        if (timer := self._timers.pop(name, None)) is not None:
            timer.cancel()
        self._timers[name] = asyncio.get_running_loop().call_later(self._quiet_s, self._settled, name)

    def _settled(self, name: str) -> None:
        del self._timers[name]
        task = asyncio.create_task(self._on_settled(name), name=f"repository-change-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 5)
        for timer in self._timers.values():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
