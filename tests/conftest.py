"""Shared fixtures: a locally generated model, and a real server over a test repository.

Engines take tens of seconds to start, so one server (three vLLM instances) is shared by every
end-to-end test of the session.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llumnix_backend.tiny_models import TinyLlamaRecipe, ensure_model
from llumnix_server.launcher import ServerProcess, llumnix_server, wait_for_repository

ENGINE_START_TIMEOUT_S = 300
API_KEY = "test-secret"

# Engines must never look for anything online during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_model(repository: Path, name: str, config: dict[str, Any] | str) -> Path:
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    (folder / "config.yaml").write_text(text)
    return folder


def tiny_config(model: str, instances: int = 1, dispatch: str = "llumnix", max_model_len: int = 1024) -> dict:
    return {
        "backend": "vllm",
        "instances": instances,
        # float32: vLLM's CPU build picks bf16 by default, and on CPUs with AMX its bf16 attention
        # kernel for a prefill over cached context (a migrated request's recomputed token) does
        # not give bit-identical results to its decode kernel, so greedy tokens can differ after
        # a switch. float32 takes the same kernels on every CPU.
        "engine": {"model": model, "max_model_len": max_model_len, "enforce_eager": True, "dtype": "float32"},
        "resources": {"cpu_kv_cache_gib": 0.125},
        "scheduler": {"dispatch_policy": dispatch},
    }


@contextlib.contextmanager
def ready_server(repository: Path, log_name: str, warm: list[str], **options: Any) -> Iterator[ServerProcess]:
    """A server on `repository` (its log beside it, `log_name`) once every model has loaded and
    `warm_up(warm)` has run; stopped on leaving. `options`: `llumnix_server`'s."""
    server = llumnix_server(repository, repository.parent / log_name, **options).start()
    try:
        wait_for_repository(server, ENGINE_START_TIMEOUT_S)
        warm_up(server, warm)
        yield server
    finally:
        server.stop()


def warm_up(server: ServerProcess, models: list[str]) -> None:
    """One short request per instance: the first requests pay one-off costs that would
    otherwise land in whichever test comes first."""
    for model in models:
        response = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60,
                              json={"model": model, "prompt": "warm up", "max_tokens": 4})
        assert response.status_code == 200, response.text


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_model(tmp_path_factory.mktemp("models") / "tiny-llama", TinyLlamaRecipe(seed=0))


@pytest.fixture(scope="session")
def killable_process(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> ServerProcess:
    """A server whose engines the failure tests kill, apart from `serving`, as started: `killable`
    waits for it. Its two models start together. Only failures, and the tests themselves, move
    requests here:
    `gamma` (test_recovery_e2e): 2 instances; a hung engine is found within 3 s.
    `wide` (test_tensor_parallel_e2e): 2 instances of tensor_parallel_size 2 (two worker
    processes each, one KV shard per rank); a hung step is found within 10 s."""
    repository = tmp_path_factory.mktemp("killable")
    gamma = tiny_config(str(tiny_model), instances=2, max_model_len=4096)
    gamma["scheduler"]["migration"] = {"rescheduling": False}
    gamma["scheduler"]["health"] = {"stale_after_s": 3, "restart_backoff_s": 0.5}
    wide = tiny_config(str(tiny_model), instances=2, max_model_len=2048)
    wide["engine"]["tensor_parallel_size"] = 2
    wide["resources"]["cpu_threads"] = 1  # per worker: six workers share this host's cores
    wide["scheduler"]["migration"] = {"rescheduling": False}
    # 10 s, not gamma's 3: six TP workers share two cores here, so a step on a loaded CI
    # machine may take seconds (the hang test waits 7 s longer for it).
    wide["scheduler"]["health"] = {"stale_after_s": 10, "restart_backoff_s": 0.5}
    write_model(repository, "gamma", gamma)
    write_model(repository, "wide", wide)
    server = llumnix_server(repository, repository.parent / "killable-server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def killable(killable_process: ServerProcess) -> ServerProcess:
    wait_for_repository(killable_process, ENGINE_START_TIMEOUT_S)
    warm_up(killable_process, ["gamma", "gamma", "wide", "wide"])
    return killable_process


# The broken folders of the shared repository: (name, config text, what its reason must say).
BROKEN_MODELS = {
    "bad-yaml": ("engine: {model: [unclosed\n", "invalid YAML: line"),
    "bad-key": ("instances: 1\ncolour: red\n", "colour: unknown key"),
    "bad-type": ("instances: two\n", "instances: Input should be a valid integer"),
    "bad-backend": ("backend: tensorrt\nengine: {model: x}\n", "backend: unknown backend 'tensorrt'"),
    "no-weights": ("engine: {model: ./weights}\n", "engine.model:"),
    "bad-engine-arg": ("engine: {model: MODEL, not_an_arg: 1}\n", "engine.not_an_arg: not a vLLM engine argument"),
    "bad-tool-parser": ("engine: {model: MODEL}\nfrontend: {tool_call_parser: nope}\n",
                        "frontend.tool_call_parser: unknown tool parser 'nope'"),
    # Valid, but this host has no GPU to give it.
    "wants-gpus": ("engine: {model: MODEL, dtype: float32}\nresources: {gpus_per_instance: 1}\n",
                   "config.yaml: resources): this host has no GPU"),
}


# A valid config in a folder whose name cannot be a model name (it would break URLs).
BADLY_NAMED = "has space"


@pytest.fixture(scope="session")
def serving(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            tiny_model: Path) -> ServerProcess:
    """`alpha`: 2 instances (llumnix dispatch, model folder given relative to its config; the
    migration tests move requests between them; tool calls read by vLLM's hermes parser);
    `beta`: 1 instance (queue dispatch) running at most 2 requests at a time, sampling KV block
    residency; `embed`: 1 instance
    of the tiny model run as an embedding model (vLLM's pooling runner); and one folder per way a
    config can be broken.

    If the session will need `killable` too, it starts now: its six engines (a minute and a half
    here) come up while the tests before it run, instead of in front of them."""
    if any("killable" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("killable_process")
    repository = tmp_path_factory.mktemp("repository")
    alpha_config = tiny_config("weights", instances=2, max_model_len=4096)
    # Migration tests freeze a destination on purpose: give up on a stage after 3 s, not 30.
    # Stages copy 2 blocks (256 KiB each) per engine step, so longer requests take several.
    alpha_config["scheduler"]["migration"] = {"stage_timeout_s": 3, "stage_chunk_mib": 0.5}
    # JSON without free whitespace, which random weights would otherwise emit for ever.
    alpha_config["engine"]["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    # Tool calls in the Hermes format the tiny model's chat template shows them in.
    alpha_config["frontend"] = {"tool_call_parser": "hermes", "enable_auto_tool_choice": True}
    alpha = write_model(repository, "alpha", alpha_config)
    (alpha / "weights").symlink_to(tiny_model)
    beta = tiny_config(str(tiny_model), dispatch="queue", max_model_len=8192)
    # At most 2 requests run at once, so the tests can make requests queue; and a long context,
    # so a request can stay in the engine for seconds however fast the tiny model decodes.
    beta["engine"]["max_num_seqs"] = 2
    # vLLM's KV block residency sampling, every block (for the metrics test).
    beta["engine"].update(kv_cache_metrics=True, kv_cache_metrics_sample=1.0)
    write_model(repository, "beta", beta)
    embed = tiny_config(str(tiny_model))
    embed["engine"].update(runner="pooling", convert="embed")
    write_model(repository, "embed", embed)
    for name, (text, _) in BROKEN_MODELS.items():
        write_model(repository, name, text.replace("MODEL", str(tiny_model)))
    write_model(repository, BADLY_NAMED, tiny_config(str(tiny_model)))

    with ready_server(repository, "server.log", ["alpha", "alpha", "beta"], api_key=API_KEY) as server:
        yield server
