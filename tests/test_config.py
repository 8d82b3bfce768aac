"""Config parsing: every error names the file, the field and why."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.config import ConfigError, DispatchPolicyName, RequestLimits, parse_model_config
from llumnix_backend.repository import load_model_source
from llumnix_backend.repository import is_valid_model_name, model_folders
from llumnix_backend.requests import RequestError, check_limits


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(text)
    return folder


def test_full_config_parses(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "m", """
backend: vllm
instances: 3
engine: {model: weights, max_model_len: 512}
resources: {cpu_kv_cache_gib: 0.5}
scheduler:
  dispatch_policy: kv_usage
  priority: {default: 1, min: 0, max: 5, high_below: 1, headroom_tokens: 64}
""")
    config = load_model_source(folder).config
    assert config.instances == 3
    assert config.engine == {"model": "weights", "max_model_len": 512}
    assert config.resources.cpu_kv_cache_gib == 0.5
    assert config.scheduler.dispatch_policy is DispatchPolicyName.KV_USAGE
    assert config.scheduler.priority.headroom_tokens == 64


def test_defaults_for_an_almost_empty_config(tmp_path: Path) -> None:
    config = load_model_source(write_config(tmp_path / "m", "engine: {model: x}\n")).config
    assert config.backend == "vllm"
    assert config.instances == 1
    assert config.scheduler.dispatch_policy is DispatchPolicyName.LLUMNIX


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("instances: 2\nfoo: 1\n", "foo", "unknown key"),
        ("instances: two\n", "instances", "valid integer"),
        ("instances: 0\n", "instances", "greater than or equal to 1"),
        ("scheduler: {dispatch_policy: random}\n", "scheduler.dispatch_policy", "round_robin"),
        ("scheduler: {priority: {colour: red}}\n", "scheduler.priority.colour", "unknown key"),
        ("resources: {cpu_kv_cache_gib: -1}\n", "resources.cpu_kv_cache_gib", "greater than 0"),
        ("scheduler: {priority: {min: 5, max: 1}}\n", "scheduler.priority", "min <= default <= max"),
        ("scheduler: {migration: {source_below: 10}}\n", "scheduler.migration", "source_below_tokens"),
        ("scheduler: {migration: {source_below_tokens: 500, destination_above_tokens: 100}}\n",
         "scheduler.migration", "at least source_below_tokens"),
        ("frontend: {limits: {max_prompts: 0}}\n", "frontend.limits.max_prompts", "greater than or equal to 1"),
        ("frontend: {limits: {max_stops: 3}}\n", "frontend.limits.max_stops", "unknown key"),
    ],
)
def test_invalid_fields_are_named(tmp_path: Path, text: str, field: str, reason: str) -> None:
    folder = write_config(tmp_path / "m", text)
    with pytest.raises(ConfigError) as caught:
        load_model_source(folder).config
    err = caught.value
    assert err.file == str(folder / "config.yaml")
    assert err.field == field
    assert reason in err.reason
    assert str(err).startswith(f"{folder / 'config.yaml'}: {field}: ")


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "m", "instances: 1\nengine: {model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML: line \d+, column \d+"):
        load_model_source(folder).config


def test_a_chat_template_is_inline_or_a_file_read_with_the_config(tmp_path: Path) -> None:
    inline = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    folder = write_config(tmp_path / "inline", f"engine: {{model: x}}\nfrontend: {{chat_template: \"{inline}\"}}\n")
    assert load_model_source(folder).config.frontend.chat_template == inline
    folder = write_config(tmp_path / "file", "engine: {model: x}\nfrontend: {chat_template: chat.jinja}\n")
    (folder / "chat.jinja").write_text(inline)
    assert load_model_source(folder).config.frontend.chat_template == inline
    (folder / "chat.jinja").unlink()
    with pytest.raises(ConfigError) as caught:
        load_model_source(folder)
    assert caught.value.field == "frontend.chat_template" and "chat.jinja" in caught.value.reason


@pytest.mark.parametrize(
    ("sampling", "field", "words"),
    [
        ({"stop": ["a", "b", "c"]}, "stop", "3 strings; at most 2 are allowed (frontend.limits.max_stop_strings)"),
        ({"stop": "abcdef"}, "stop", "longer than 5 characters (frontend.limits.max_stop_chars)"),
        ({"bad_words": ["x"] * 4}, "bad_words", "at most 3 are allowed (frontend.limits.max_bad_words)"),
        ({"bad_words": ["x" * 7]}, "bad_words", "longer than 6 characters (frontend.limits.max_bad_word_chars)"),
        ({"logit_bias": {str(i): 1 for i in range(9)}}, "logit_bias", "9 entries; at most 8"),
        ({"allowed_token_ids": list(range(9))}, "allowed_token_ids", "frontend.limits.max_token_list"),
        ({"stop_token_ids": list(range(9))}, "stop_token_ids", "at most 8"),
    ],
)
def test_request_limits_are_the_models_own(sampling: dict, field: str, words: str) -> None:
    limits = RequestLimits(max_stop_strings=2, max_stop_chars=5, max_bad_words=3, max_bad_word_chars=6,
                           max_token_list=8)
    with pytest.raises(RequestError) as caught:
        check_limits(sampling, limits)
    assert caught.value.field == field and words in str(caught.value)
    check_limits(sampling, RequestLimits())  # within the defaults


def test_missing_config_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="no config.yaml"):
        load_model_source(tmp_path / "m")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_model_config(["a", "b"], "x/config.yaml")


@given(st.dictionaries(st.text(min_size=1, max_size=12), st.integers() | st.text(max_size=5), max_size=4))
def test_arbitrary_top_level_keys_never_crash(data: dict) -> None:
    """Any mapping either parses or raises ConfigError naming a field: nothing else escapes."""
    try:
        parse_model_config(data, "m/config.yaml")
    except ConfigError as err:
        assert err.field
        assert err.reason


def test_model_folders_skip_hidden_and_files(tmp_path: Path) -> None:
    for name in ("b", "a", ".git", "_scratch"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.md").write_text("x")
    assert list(model_folders(tmp_path)) == ["a", "b"]


@pytest.mark.parametrize("name", ["llama", "llama-7b", "m.v2", "A_1"])
def test_valid_model_names(name: str) -> None:
    assert is_valid_model_name(name)


@pytest.mark.parametrize("name", ["", "..", ".", "a/b", "../x", "a b", "-x"])
def test_invalid_model_names(name: str) -> None:
    assert not is_valid_model_name(name)
