"""A bounded streaming load generator for OpenAI-compatible servers, and report helpers.

Every run is bounded twice: a fixed number of requests, and a wall-clock limit per request.
"""

from __future__ import annotations

import asyncio
import json
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


@dataclass(frozen=True)
class RequestResult:
    ttft: float  # seconds from sending to the first streamed token
    latency: float  # seconds from sending to the end of the stream
    output_tokens: int
    error: str | None = None


@dataclass(frozen=True)
class WorkloadResult:
    requests: tuple[RequestResult, ...]
    wall_time: float

    @property
    def ok(self) -> tuple[RequestResult, ...]:
        return tuple(r for r in self.requests if r.error is None)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)


async def stream_completion(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
                            timeout: float) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return RequestResult(0, 0, 0, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and first is None:
                        first = time.perf_counter()
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
    except (httpx.HTTPError, TimeoutError) as exc:
        return RequestResult(0, 0, 0, repr(exc))
    end = time.perf_counter()
    if first is None:
        return RequestResult(0, 0, 0, "no token streamed")
    return RequestResult(first - began, end - began, tokens)


async def run_workload(base_url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
                       headers: dict[str, str] | None = None, timeout: float = 300) -> WorkloadResult:
    """Send every prompt once, at most `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as client:

        async def one(prompt: list[int]) -> RequestResult:
            async with gate:
                return await stream_completion(client, model, prompt, max_tokens, timeout)

        began = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return WorkloadResult(tuple(results), time.perf_counter() - began)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def run_benchmark(main: Callable[[], None]) -> None:
    """Run a benchmark's `main` so that SIGTERM (a `kill`, a CI timeout) unwinds it like Ctrl-C:
    its `finally` blocks stop the servers and Ray clusters it started, which Python's default
    SIGTERM (exit at once) would leave running."""
    def unwind(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    main()


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def publish(name: str, result: dict, title: str, text: str) -> Path:
    """Print a benchmark's JSON and table, and keep both in docs/benchmarks/NAME.{json,md} (the
    markdown under `title`, with the command that produced it); returns where a plot of the
    same run belongs (NAME.png)."""
    print(json.dumps(result, indent=2))
    print(text)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (DOCS / f"{name}.md").write_text(f"# {title}\n\n    {result['command']}\n\n{text}\n")
    return DOCS / f"{name}.png"
