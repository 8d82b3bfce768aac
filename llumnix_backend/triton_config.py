"""Triton's repository format for a model folder, as Triton's vLLM backend lays it out:

    <model>/config.pbtxt             backend: "vllm"
                                     instance_group [{ count: 2 }]
                                     parameters { key: "scheduler.dispatch_policy"
                                                  value: { string_value: "queue" } }
    <model>/<version>/model.json     vLLM engine arguments ({"model": ..., ...})

`config.pbtxt` is parsed with protobuf's text format against Triton's own `ModelConfig` message
(shipped in tritonclient), so anything Triton accepts parses, and a typo is reported with its
line and column. The instance count is the sum of the instance groups' counts. Settings of
config.yaml's `scheduler`, `resources` and `frontend` sections go in `parameters`, keyed by their path
there; a value is read as a YAML scalar ("true", "0.5", "queue"). Fields about Triton's tensor
interface (inputs, outputs, batching) have no meaning for an LLM server and are ignored.

Version folders follow Triton: numeric names only, and the highest one the version policy
allows is served (`latest` and `all` serve the highest, `specific` the highest listed).
Relative paths in model.json start from its version folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llumnix_backend.config import ConfigError, ModelSource, parse_model_config

TRITON_CONFIG_FILE = "config.pbtxt"
ENGINE_ARGS_FILE = "model.json"
# The config.yaml sections a `parameters` key may set.
PARAMETER_SECTIONS = ("scheduler", "resources", "frontend")


def load_triton_model(model_dir: Path, num_gpus: int = 0) -> ModelSource:
    path = model_dir / TRITON_CONFIG_FILE
    triton = _parse_pbtxt(path)
    if triton.name and triton.name != model_dir.name:
        raise ConfigError(path, "name", f"{triton.name!r} differs from the folder's name {model_dir.name!r}")
    if not triton.backend:
        raise ConfigError(path, "backend", "missing (this server runs backend: \"vllm\")")
    data: dict[str, Any] = {"backend": triton.backend, "engine": None}
    if triton.instance_group:
        groups = [(group.Kind.Name(group.kind), group.count or 1, list(group.gpus)) for group in triton.instance_group]
        try:
            data["instances"], pinned = triton_instance_groups(groups, num_gpus)
        except ValueError as exc:
            raise ConfigError(path, "instance_group", str(exc)) from None
        if pinned is not None:
            data.setdefault("resources", {})["gpus"] = [list(p) for p in pinned]
    for key, value in sorted(triton.parameters.items()):
        _set_parameter(data, key, value.string_value, path)
    version = _served_version(model_dir, triton, path)
    engine_file = model_dir / str(version) / ENGINE_ARGS_FILE
    data["engine"] = _read_engine_args(engine_file)
    return ModelSource(parse_model_config(data, path), config_file=str(path), engine_file=str(engine_file),
                       engine_dir=engine_file.parent, engine_field_prefix="", version=version)


def triton_instance_groups(groups: list[tuple[str, int, list[int]]], num_gpus: int
                           ) -> tuple[int, tuple[tuple[int, ...], ...] | None]:
    """Triton's instance groups, (kind, count, gpus) each, as an instance count and pinned GPU
    placements (None: placed by `resources`). As in Triton, a KIND_GPU group puts `count`
    instances on each GPU it lists, or on each GPU of the host; other kinds only count. On a
    host without GPUs (the CPU build) a KIND_GPU group only counts too."""
    gpu_groups = [g for g in groups if g[0] == "KIND_GPU"] if num_gpus else []
    if not gpu_groups:
        return sum(count for _, count, _ in groups), None
    if len(gpu_groups) != len(groups):
        raise ValueError("KIND_GPU groups cannot be mixed with other kinds (use one kind for every group)")
    pinned = tuple((gpu,) for _, count, gpus in gpu_groups for gpu in (gpus or range(num_gpus)) for _ in range(count))
    return len(pinned), pinned


def _parse_pbtxt(path: Path):
    # Imported here: only models in Triton's format need protobuf and tritonclient.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, f"cannot read: {exc}") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        # The message starts with "line:column : "; say it in words.
        message = str(exc).split(" : ", 1)[-1]
        raise ConfigError(path, None, f"line {exc.GetLine()}, column {exc.GetColumn()}: {message}") from None


def _set_parameter(data: dict[str, Any], key: str, text: str, path: Path) -> None:
    parts = key.split(".")
    if parts[0] not in PARAMETER_SECTIONS or len(parts) < 2 or not all(parts):
        raise ConfigError(path, f"parameters[{key!r}]", "unknown key: use the path of a setting under "
                                                        f"{' or '.join(PARAMETER_SECTIONS)}, e.g. scheduler.dispatch_policy")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(path, f"parameters[{key!r}]", f"{part} is a value, not a section")
    node[parts[-1]] = value


def _served_version(model_dir: Path, triton, path: Path) -> int:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ConfigError(model_dir, None, f"no version folder (a numbered folder holding {ENGINE_ARGS_FILE})")
    policy = triton.version_policy
    if policy.WhichOneof("policy_choice") == "specific":
        wanted = set(policy.specific.versions)
        allowed = [v for v in versions if v in wanted]
        if not allowed:
            raise ConfigError(path, "version_policy.specific.versions",
                              f"none of {sorted(wanted)} has a folder (found {versions})")
        return allowed[-1]
    return versions[-1]


def _read_engine_args(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(path, None, "missing: the version folder needs the vLLM engine arguments")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(path, None, f"invalid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, f"cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"expected a JSON object of engine arguments, got {type(data).__name__}")
    return data
