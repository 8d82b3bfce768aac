"""The model repository on disk: one folder per model, named as the model is served."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from llumnix_backend.config import CONFIG_FILE, ConfigError, ModelSource, load_model_config
from llumnix_backend.triton_config import TRITON_CONFIG_FILE, load_triton_model

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


def load_model_source(model_dir: Path, num_gpus: int = 0) -> ModelSource:
    """Read and validate a model folder: `config.yaml`, or Triton's `config.pbtxt` (whose GPU
    instance groups depend on the host's `num_gpus`)."""
    yaml_file, triton_file = model_dir / CONFIG_FILE, model_dir / TRITON_CONFIG_FILE
    if triton_file.is_file():
        if yaml_file.is_file():
            raise ConfigError(model_dir, None, f"both {CONFIG_FILE} and {TRITON_CONFIG_FILE}: keep one")
        return _with_chat_template_read(load_triton_model(model_dir, num_gpus), model_dir)
    if not yaml_file.is_file():
        raise ConfigError(model_dir, None, f"no {CONFIG_FILE} (or Triton's {TRITON_CONFIG_FILE}) in the model folder")
    return _with_chat_template_read(ModelSource(load_model_config(yaml_file), str(yaml_file), str(yaml_file), model_dir),
                                    model_dir)


def _with_chat_template_read(source: ModelSource, model_dir: Path) -> ModelSource:
    """The source with `frontend.chat_template` as the template itself: a file it names is read
    here, with the config, never on a request's path."""
    frontend = source.config.frontend
    if frontend.chat_template is None or frontend.chat_template_is_inline:
        return source
    path = model_dir / frontend.chat_template
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source.config_file, "frontend.chat_template",
                          f"neither a Jinja template nor a readable file: {path}: {exc}") from None
    frontend = frontend.model_copy(update={"chat_template": text})
    return dataclasses.replace(source, config=source.config.model_copy(update={"frontend": frontend}))
