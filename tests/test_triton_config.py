"""Model folders in Triton's format: config.pbtxt (protobuf text, Triton's ModelConfig) and
numbered version folders with model.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llumnix_backend.config import ConfigError, DispatchPolicyName
from llumnix_backend.repository import load_model_source

PBTXT = """
backend: "vllm"
max_batch_size: 0
model_transaction_policy { decoupled: true }
instance_group [ { count: 2, kind: KIND_MODEL }, { count: 1 } ]
parameters { key: "scheduler.dispatch_policy" value: { string_value: "queue" } }
parameters { key: "scheduler.migration.rescheduling" value: { string_value: "false" } }
parameters { key: "resources.cpu_kv_cache_gib" value: { string_value: "0.25" } }
"""


def triton_folder(root: Path, pbtxt: str = PBTXT, versions: dict[str, object] | None = None) -> Path:
    folder = root / "m"
    folder.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(pbtxt)
    for version, engine in (versions if versions is not None else {"1": {"model": "weights"}}).items():
        (folder / version).mkdir()
        (folder / version / "model.json").write_text(engine if isinstance(engine, str) else json.dumps(engine))
    return folder


def test_a_triton_folder_maps_to_instances_scheduler_and_engine_arguments(tmp_path: Path) -> None:
    folder = triton_folder(tmp_path)
    source = load_model_source(folder)
    config = source.config
    assert config.backend == "vllm"
    assert config.instances == 3  # the instance groups' counts added up
    assert config.scheduler.dispatch_policy is DispatchPolicyName.QUEUE
    assert config.scheduler.migration.rescheduling is False  # "false" read as a YAML scalar
    assert config.resources.cpu_kv_cache_gib == 0.25
    assert config.engine == {"model": "weights"}
    assert source.version == 1
    # Relative engine paths start from the version folder; errors name model.json's own keys.
    assert source.engine_dir == folder / "1"
    assert source.engine_file == str(folder / "1" / "model.json")
    assert source.engine_field("model") == "model"


def test_the_highest_numeric_version_is_served_unless_the_policy_says_otherwise(tmp_path: Path) -> None:
    versions = {"1": {"model": "a"}, "3": {"model": "c"}, "10": {"model": "j"}, "latest": {"model": "x"}}
    source = load_model_source(triton_folder(tmp_path / "latest", versions=versions))
    assert (source.version, source.config.engine["model"]) == (10, "j")  # numeric order, not text order
    specific = PBTXT + "version_policy { specific { versions: [1, 3] } }\n"
    source = load_model_source(triton_folder(tmp_path / "specific", specific, versions))
    assert (source.version, source.config.engine["model"]) == (3, "c")


@pytest.mark.parametrize(
    ("pbtxt", "file", "field", "reason"),
    [
        ('backend: "vllm"\ninstance_group [ { count: 2 } ]\ncolour: "red"\n', "config.pbtxt", None,
         'line 3, column 1: Message type "inference.ModelConfig" has no field named "colour"'),
        ('backend: "vllm"\ninstance_group [ { count: two } ]\n', "config.pbtxt", None, "line 2, column"),
        ('backend: "vllm"\nparameters { key: "dispatch" value: { string_value: "queue" } }\n', "config.pbtxt",
         "parameters['dispatch']", "unknown key"),
        ('backend: "vllm"\nparameters { key: "scheduler.colour" value: { string_value: "red" } }\n', "config.pbtxt",
         "scheduler.colour", "unknown key"),
        ('name: "other"\nbackend: "vllm"\n', "config.pbtxt", "name", "differs from the folder's name 'm'"),
        ('max_batch_size: 0\n', "config.pbtxt", "backend", "missing"),
        ('backend: "vllm"\nversion_policy { specific { versions: [7] } }\n', "config.pbtxt",
         "version_policy.specific.versions", "none of [7] has a folder"),
    ],
)
def test_config_pbtxt_errors_name_the_file_the_line_and_the_field(tmp_path, pbtxt, file, field, reason) -> None:
    folder = triton_folder(tmp_path, pbtxt)
    with pytest.raises(ConfigError) as caught:
        load_model_source(folder)
    assert (Path(caught.value.file).name, caught.value.field) == (file, field)
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("versions", "reason"),
    [
        ({"1": '{"model": "weights",\n  "max_model_len": }\n'}, "invalid JSON: line 2, column 20"),
        ({"1": '["weights"]'}, "expected a JSON object"),
        ({"not-a-version": {"model": "weights"}}, "no version folder"),
    ],
)
def test_model_json_errors_name_the_file_and_the_line(tmp_path: Path, versions: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_model_source(triton_folder(tmp_path, versions=versions))


def test_a_version_folder_without_model_json_is_reported(tmp_path: Path) -> None:
    folder = triton_folder(tmp_path, versions={})
    (folder / "2").mkdir()
    with pytest.raises(ConfigError) as caught:
        load_model_source(folder)
    assert caught.value.file == str(folder / "2" / "model.json") and "missing" in caught.value.reason


def test_a_folder_with_both_formats_is_refused(tmp_path: Path) -> None:
    folder = triton_folder(tmp_path)
    (folder / "config.yaml").write_text("instances: 1\n")
    with pytest.raises(ConfigError, match="both config.yaml and config.pbtxt: keep one"):
        load_model_source(folder)
