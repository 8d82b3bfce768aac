"""Following the repository folder: which paths count, and debouncing, on a real filesystem
with watchdog (no engines)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from llumnix_backend.repository_watcher import RepositoryWatcher, model_of


def test_paths_map_to_their_model_folder(tmp_path: Path) -> None:
    assert model_of(tmp_path / "llama" / "config.yaml", tmp_path) == "llama"
    assert model_of(tmp_path / "llama" / "weights" / "model.safetensors", tmp_path) == "llama"
    assert model_of(tmp_path / "llama", tmp_path) == "llama"


def test_hidden_temporary_and_outside_paths_do_not_count(tmp_path: Path) -> None:
    for ignored in (".git/HEAD", "llama/.config.yaml.swp", "llama/config.yaml~", "llama/4913.tmp",
                    "_staging/config.yaml", "llama/weights.part"):
        assert model_of(tmp_path / ignored, tmp_path) is None, ignored
    assert model_of(tmp_path, tmp_path) is None
    assert model_of(tmp_path.parent / "elsewhere" / "config.yaml", tmp_path) is None


def test_a_model_is_acted_on_once_its_folder_has_settled(tmp_path: Path) -> None:
    settled: Counter[str] = Counter()
    times: dict[str, float] = {}

    async def scenario() -> None:
        async def on_settled(name: str) -> None:
            settled[name] += 1
            times[name] = time.monotonic()

        watcher = RepositoryWatcher(tmp_path, on_settled, quiet_s=0.4)
        watcher.start()
        try:
            # A folder copied in several writes, 0.1 s apart: one action, after the last write.
            (tmp_path / "copied").mkdir()
            for i in range(5):
                (tmp_path / "copied" / f"part-{i}").write_text("x" * 1000)
                last_write = time.monotonic()
                await asyncio.sleep(0.1)
            (tmp_path / "other").mkdir()
            (tmp_path / "other" / ".config.yaml.swp").write_text("editor scratch")  # ignored...
            (tmp_path / "other" / "config.yaml").write_text("instances: 1\n")  # ...this is not
            await asyncio.sleep(1.2)
        finally:
            await watcher.stop()
        assert settled == Counter({"copied": 1, "other": 1})
        assert times["copied"] - last_write >= 0.35  # only once the folder was quiet

    asyncio.run(scenario())
