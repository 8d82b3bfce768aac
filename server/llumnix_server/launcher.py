"""Start `llumnix-serve` (or any OpenAI-compatible server) as a child process and wait for it.

Used by the end-to-end tests and the benchmarks: they talk to a real server over HTTP on
127.0.0.1, exactly as users do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each socket stays bound until all are picked (picked one
    at a time, two could be the same port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class ServerFailed(RuntimeError):
    pass


@dataclass
class ServerProcess:
    """A server started with `command`, logging to `log_path`."""

    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    process: subprocess.Popen | None = None
    grpc_port: int | None = None  # KServe gRPC, when the server has it on

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        # Same session as the caller on purpose: with Linux's autogroup scheduling a server in a
        # session of its own competes with its client as a group, and its streams stall for
        # seconds at a time on a 2-core host (seen in tests and benchmarks).
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )
        return self

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_until(self, path: str, ok: Callable[[httpx.Response], bool], timeout: float) -> httpx.Response:
        """Poll GET `path` until `ok(response)` holds; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerFailed(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(self.url + path, headers=self.headers, timeout=5)
                if ok(response):
                    return response
                last_error = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last_error = repr(exc)
            time.sleep(0.5)
        raise ServerFailed(f"{path} not ready after {timeout:.0f} s ({last_error}):\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait for it to exit; kill it if it does not."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # its engines notice and exit on their own
            return self.process.wait(10)


def llumnix_server(repository: Path, log_path: Path, api_key: str | None = None, port: int | None = None,
                   extra_args: tuple[str, ...] = ()) -> ServerProcess:
    """HTTP on `port` (a free one by default), gRPC on another free port (`grpc_port`)."""
    http_port, grpc_port = free_ports(2)
    port = port or http_port
    if grpc_port == port:
        grpc_port = http_port
    command = [sys.executable, "-m", "llumnix_server.cli", "--model-repository", str(repository),
               "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port), *extra_args]
    if api_key:
        command += ["--api-key", api_key]
    return ServerProcess(command, port, log_path, api_key=api_key, grpc_port=grpc_port)


def wait_for_repository(server: ServerProcess, timeout: float) -> list[dict]:
    """Wait until no model of the repository is LOADING; returns the repository index."""
    server.wait_until("/v2/health/live", lambda r: r.status_code == 200, timeout)
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(server.url + "/v2/repository/index", headers=server.headers, timeout=30)
        index = response.json()
        # An empty index is final only once the server says it has nothing more to load.
        if all(m["state"] != "LOADING" for m in index) and (
                index or httpx.get(server.url + "/v2/health/ready", headers=server.headers, timeout=30).is_success):
            return index
        if time.monotonic() > deadline:
            raise ServerFailed(f"models still loading after {timeout:.0f} s: {index}\n{server.log_tail()}")
        if server.process is not None and server.process.poll() is not None:
            raise ServerFailed(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        time.sleep(0.5)
