"""Start-up and shutdown of a real server: no engine process outlives it."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import ENGINE_START_TIMEOUT_S, tiny_config, write_model
from llumnix_client import StreamedCompletion
from llumnix_server.launcher import ServerProcess, llumnix_server, wait_for_repository

pytestmark = pytest.mark.engine


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


# Each test below ends its server with a signal, so each has a server of its own. They start
# together: an engine start is mostly waiting on process spawns, so three cost about one.
SINGLE_USE = {"sigint": ("--start-progress-s", "2"), "sigkill": (), "grace": ("--shutdown-grace-s", "3")}


@pytest.fixture(scope="module")
def single_use_servers(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, ServerProcess]:
    servers = {}
    for name, extra_args in SINGLE_USE.items():
        folder = tmp_path_factory.mktemp(f"lifecycle-{name}")
        write_model(folder / "repo", "solo", tiny_config(str(tiny_model), max_model_len=8192))
        servers[name] = llumnix_server(folder / "repo", folder / "server.log", extra_args=extra_args).start()
    try:
        for server in servers.values():
            index = wait_for_repository(server, ENGINE_START_TIMEOUT_S)
            assert index[0]["state"] == "READY", index
        yield servers
    finally:
        for server in servers.values():
            server.stop(signal.SIGKILL)


def test_the_terminal_tells_what_a_starting_instance_is_doing(single_use_servers) -> None:
    log = single_use_servers["sigint"].log_tail(100_000)
    assert "[llumnix] solo/0: starting engine" in log, log
    assert re.search(r"\[llumnix\] solo/0: after \d+ s: vLLM builds the engine \(loads the weights", log), log
    assert re.search(r"\[llumnix\] solo/0: ready in \d+\.\d s", log), log


# SIGTERM, under load, is test_sigterm_lets_short_requests_finish_and_ends_long_ones_after_the_grace.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_no_engine_process_survives_the_server(single_use_servers, sig: int) -> None:
    server = single_use_servers[signal.Signals(sig).name.lower()]
    # No --api-key: requests need no Authorization header.
    response = httpx.post(server.url + "/v1/completions", json={"model": "solo", "prompt": "hi", "max_tokens": 3},
                          timeout=60)
    assert response.status_code == 200, response.text
    engines = _descendants(server.process.pid)
    assert engines, "the engine runs in child processes of the server"
    began = time.monotonic()
    server.stop(sig, timeout=60)
    # After SIGKILL nobody shuts the engines down: they notice they are orphaned and exit.
    alive = _wait_gone(engines, timeout=30)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}\n{server.log_tail()}"
    assert time.monotonic() - began < 60


def test_a_server_on_an_empty_repository_is_ready_at_once(tmp_path: Path) -> None:
    """Nothing to load: ready, so that folders can be dropped in (poll mode, the default)."""
    (tmp_path / "repo").mkdir()
    server = llumnix_server(tmp_path / "repo", tmp_path / "server.log").start()
    try:
        assert wait_for_repository(server, ENGINE_START_TIMEOUT_S) == []
        assert httpx.get(server.url + "/v2/health/ready", timeout=10).status_code == 200
        assert httpx.post(server.url + "/v2/repository/index", timeout=10).json() == []
    finally:
        server.stop()


def test_sigterm_lets_short_requests_finish_and_ends_long_ones_after_the_grace(single_use_servers) -> None:
    server = single_use_servers["grace"]
    short = StreamedCompletion(server, "solo", max_tokens=60).wait_for_tokens(1)
    endless = StreamedCompletion(server, "solo", max_tokens=7000).wait_for_tokens(1)
    engines = _descendants(server.process.pid)
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    short.result()
    assert short.finish_reason == "length" and len(short.token_ids) == 60
    with pytest.raises(KeyError):  # its last event is an error, not a choice
        endless.result()
    assert endless.error_event["code"] == 503 and "shut down" in endless.error_event["message"]
    assert 3 <= time.monotonic() - began < 30
    assert server.process.wait(30) is not None
    assert not _wait_gone(engines, timeout=30)
    log = server.log_path.read_text()
    assert "Traceback" not in log and "leaked" not in log, server.log_tail()
    # One line per request as it ends, with what it was and how it ended.
    assert re.search(r"model=solo instance=0 request=\S+ prompt_tokens=\d+ output_tokens=60 ttft_ms=\d+ "
                     r"e2e_ms=\d+ outcome=success", log), log[-3000:]
    assert re.search(r"model=solo .* outcome=shutdown", log)


def test_the_request_log_can_be_turned_off(tmp_path: Path) -> None:
    from llumnix_server.cli import parse_args

    assert parse_args(["--model-repository", str(tmp_path)]).request_log
    assert not parse_args(["--model-repository", str(tmp_path), "--no-request-log"]).request_log
