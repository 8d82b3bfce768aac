"""What the migration and rescheduling tests do over HTTP: stream a completion on a thread, and
read or act on a model's instances through the Llumnix operations API and /metrics."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator

import httpx

from llumnix_server.launcher import ServerProcess

PROMPT = "Migration moves a running request between instances without stopping it. " * 4
# Long enough that the request is still decoding (seconds) when a test acts on it.
MAX_TOKENS = 2000


class StreamedCompletion:
    """A streaming completion read on a thread, so the test can act while it runs."""

    def __init__(self, server: ServerProcess, model: str = "alpha", **overrides) -> None:
        self.body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                     "ignore_eos": True, "stream": True, "return_token_ids": True, **overrides}
        self.server = server
        self.request_id: str | None = None
        self.token_ids: list[int] = []
        self.chunks: list[list[int]] = []
        self.text: list[str] = []
        self.logprobs: list[float] = []  # each token's, when the request asked for logprobs
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.error_event: dict | None = None  # the stream's in-band error, if it ended with one
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with httpx.Client(base_url=self.server.url, headers=self.server.headers, timeout=120) as client:
                with client.stream("POST", "/v1/completions", json=self.body) as response:
                    assert response.status_code == 200, response.read()
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        self.error_event = event.get("error")
                        with self._progress:
                            self.request_id = event["id"]
                            for choice in event["choices"]:
                                self.chunks.append(choice["token_ids"])
                                self.token_ids += choice["token_ids"]
                                self.text.append(choice["text"])
                                self.logprobs += (choice.get("logprobs") or {}).get("token_logprobs") or []
                                self.finish_reason = choice["finish_reason"] or self.finish_reason
                            self._progress.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc
        finally:
            with self._progress:
                self._progress.notify_all()

    def wait_for_tokens(self, n: int, timeout: float = 30) -> StreamedCompletion:
        with self._progress:
            assert self._progress.wait_for(lambda: len(self.token_ids) >= n or not self._thread.is_alive(), timeout)
        assert len(self.token_ids) >= n, f"the request ended after {len(self.token_ids)} tokens"
        return self

    def result(self) -> StreamedCompletion:
        self._thread.join(120)
        if self.error is not None:
            raise self.error
        return self


class BoundedLoad:
    """Streaming completions of `max_tokens` tokens against a model, `concurrency` at a time,
    each started when the previous one ends, until `stop()` or `max_requests` were sent."""

    def __init__(self, server: ServerProcess, model: str, concurrency: int = 2, max_tokens: int = 300,
                 max_requests: int = 200) -> None:
        self.runs: list[StreamedCompletion] = []
        self._args = (server, model, max_tokens, max_requests)
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(concurrency)]
        for worker in self._workers:
            worker.start()

    def _work(self) -> None:
        server, model, max_tokens, max_requests = self._args
        while not self._stopped.is_set():
            with self._lock:
                if len(self.runs) >= max_requests:
                    return
                run = StreamedCompletion(server, model, max_tokens=max_tokens)
                self.runs.append(run)
            with contextlib.suppress(BaseException):  # kept in run.error
                run.result()

    def stop(self) -> list[StreamedCompletion]:
        """Send no more; wait for the requests in flight; all requests sent."""
        self._stopped.set()
        for worker in self._workers:
            worker.join(180)
        return self.runs


class InBackground:
    """Runs `call()` on a thread; `result()` joins it and returns what it returned."""

    def __init__(self, call) -> None:
        self._outcome: list = []
        self._thread = threading.Thread(target=lambda: self._outcome.append(call()), daemon=True)
        self._thread.start()

    def result(self, timeout: float = 60):
        self._thread.join(timeout)
        assert self._outcome, "the call did not return"
        return self._outcome[0]


def short_generation(server: ServerProcess, model: str) -> httpx.Response:
    """A 4-token KServe generate request: whether the model answers now."""
    return httpx.post(f"{server.url}/v2/models/{model}/generate", headers=server.headers, timeout=60,
                      json={"text_input": "Hello", "parameters": {"max_tokens": 4}})


def instances(server: ServerProcess, model: str = "alpha") -> dict[str, dict]:
    listing = httpx.get(f"{server.url}/v2/llumnix/models/{model}/instances", headers=server.headers).json()
    return {i["id"]: i for i in listing["instances"]}


def running_on(server: ServerProcess, request_id: str, model: str = "alpha") -> str:
    listed = instances(server, model)
    # (An instance being restarted has no snapshot yet.)
    found = [i for i, info in listed.items()
             if request_id in [r["request_id"] for r in (info["snapshot"] or {}).get("running", [])]]
    assert len(found) == 1, json.dumps(listed)[:3000]
    return found[0]


def migrate(server: ServerProcess, request_id: str, to: str, model: str = "alpha", **options) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/llumnix/models/{model}/migrate", headers=server.headers, timeout=60,
                      json={"request_id": request_id, "to": to, **options})


def set_draining(server: ServerProcess, instance: str, draining: bool, model: str = "alpha") -> None:
    action = "drain" if draining else "resume"
    response = httpx.post(f"{server.url}/v2/llumnix/models/{model}/instances/{instance}/{action}",
                          headers=server.headers)
    assert response.status_code == 200, response.text


def other(instance: str) -> str:
    return {"0": "1", "1": "0"}[instance]


def blocks_in_use(server: ServerProcess, model: str = "alpha") -> dict[str, int]:
    return {i: info["snapshot"]["used_blocks"] for i, info in instances(server, model).items()
            if info["snapshot"] is not None}


def wait_idle(server: ServerProcess, model: str = "alpha", timeout: float = 10) -> dict[str, int]:
    """Blocks in use per instance, once all are zero or `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while any((used := blocks_in_use(server, model)).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return used


def migrations(server: ServerProcess, model: str, outcome: str = "committed") -> dict[tuple[str, str], float]:
    """Migrations per (source, destination) so far, read from /metrics; `outcome` is started,
    committed or aborted."""
    found: dict[tuple[str, str], float] = {}
    pattern = re.compile(rf"^llumnix:migrations_{outcome}_total\{{(.*)\}} (\S+)$")
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if match := pattern.match(line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
            if labels["model_name"] == model:
                pair = (labels["source"], labels["destination"])
                found[pair] = found.get(pair, 0.0) + float(match[2])
    return found


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Stop a process (SIGSTOP) for the block's duration: an engine that stops responding."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def engine_pid(server: ServerProcess, instance: str, model: str = "alpha") -> int:
    pid = instances(server, model)[instance]["snapshot"]["engine_pid"]
    assert pid > 0
    return pid
