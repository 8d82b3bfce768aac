"""The model repository on disk: one folder per model, named as the model is served."""

from __future__ import annotations

import re
from pathlib import Path

# A model name is a plain folder name: it appears in URLs and metric labels.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_valid_model_name(name: str) -> bool:
    return bool(_MODEL_NAME.match(name)) and name not in (".", "..")


def model_folders(repository: Path) -> dict[str, Path]:
    """The model folders of `repository` by model name, sorted; hidden folders are skipped."""
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository} is not a folder")
    return {
        entry.name: entry
        for entry in sorted(repository.iterdir())
        if entry.is_dir() and not entry.name.startswith((".", "_"))
    }
