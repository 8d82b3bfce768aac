"""Can one client's heavy input hold up everyone else? Health probes and a running stream, idle
against under a flood of heavy requests, in the same run on the same server.

One llumnix-serve with one instance of the generated tiny model. Two phases of `--seconds`
each, the same probes in both:
- a health probe (`/v2/health/live`) every 20 ms, each timed;
- one streaming completion, its gaps between tokens timed (other clients' streams).

The flood phase adds `--clients` clients that each send, back to back, the heaviest bodies
the limits let through: a 3.5 MB prompt (tokenised, then refused as longer than the context),
256 prompts of 2,000 words, and 64 stop strings of 1,024 characters with a 100,000-word prompt.
Target: under the flood, no probe and no gap over 100 ms (the issue's bound). Bounded: each
phase ends after `--seconds`, and each request has a 60 s limit. Prints JSON and a table;
writes docs/benchmarks/input_flood.{json,md}.

    python benchmarks/input_flood.py [--seconds 15] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import yaml

from llumnix_backend.tiny_models import TinyLlamaRecipe, ensure_model
from llumnix_server.launcher import llumnix_server, wait_for_repository

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, percentile, publish, run_benchmark  # noqa: E402

MODEL = "flood"
TARGET_S = 0.1
HEAVY_BODIES = (
    {"prompt": "hello world, " * 270_000, "max_tokens": 2},
    {"prompt": ["many words " * 1_000] * 256, "max_tokens": 2},
    {"prompt": "word " * 100_000, "max_tokens": 2, "stop": ["x" * 1024] * 64},
)


async def probe(client: httpx.AsyncClient, until: float) -> list[float]:
    waits = []
    while time.monotonic() < until:
        began = time.monotonic()
        response = await client.get("/v2/health/live")
        assert response.status_code == 200, response.status_code
        waits.append(time.monotonic() - began)
        await asyncio.sleep(0.02)
    return waits


async def stream_gaps(client: httpx.AsyncClient, until: float) -> list[float]:
    """Token gaps of streams run one after another until `until`."""
    gaps: list[float] = []
    while time.monotonic() < until:
        body = {"model": MODEL, "prompt": "a stream of its own", "max_tokens": 200, "ignore_eos": True,
                "temperature": 0.0, "stream": True}
        last = None
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                if last is not None and json.loads(line[6:]).get("choices"):
                    gaps.append(now - last)
                last = now
    return gaps


def flood(url: str, until: float, index: int) -> int:
    """One flooding client, in a process of its own with its bodies encoded up front, so that
    the probes (on this process's event loop) time the server, not the flood's clients: on
    threads of this process they held the GIL while the probes waited."""
    bodies = [json.dumps({"model": MODEL, **body}).encode() for body in HEAVY_BODIES]
    sent = 0
    with httpx.Client(base_url=url, timeout=60, headers={"content-type": "application/json"}) as client:
        while time.monotonic() < until:
            response = client.post("/v1/completions", content=bodies[(index + sent) % len(bodies)])
            assert response.status_code in (200, 400), response.text[:200]
            sent += 1
    return sent


async def phase(url: str, seconds: float, clients: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        until = time.monotonic() + seconds
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(max(1, clients)) as pool:
            results = await asyncio.gather(probe(client, until), stream_gaps(client, until),
                                           *(loop.run_in_executor(pool, flood, url, until, i) for i in range(clients)))
    probes, gaps, sent = results[0], results[1], sum(results[2:])

    def figures(values: list[float]) -> dict:
        return {"n": len(values), "p50_ms": round(1e3 * percentile(values, 50), 1),
                "p99_ms": round(1e3 * percentile(values, 99), 1), "max_ms": round(1e3 * max(values), 1)}

    return {"clients": clients, "heavy_requests": sent, "health_probe": figures(probes), "stream_gap": figures(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="input-flood-") as tmp:
        work = Path(tmp)
        folder = work / "repository" / MODEL
        folder.mkdir(parents=True)
        model = ensure_model(work / "model", TinyLlamaRecipe(seed=0))
        folder.joinpath("config.yaml").write_text(yaml.safe_dump({
            "engine": {"model": str(model), "enforce_eager": True, "max_model_len": 2048},
            "resources": {"cpu_kv_cache_gib": 0.125, "cpu_threads": 1}}))
        server = llumnix_server(work / "repository", work / "server.log").start()
        try:
            wait_for_repository(server, 300)
            idle = asyncio.run(phase(server.url, args.seconds, 0))
            flooded = asyncio.run(phase(server.url, args.seconds, args.clients))
        finally:
            server.stop()
    worst = max(flooded["health_probe"]["max_ms"], flooded["stream_gap"]["max_ms"])
    result = {"benchmark": "input_flood", "command": command_line(), "settings": vars(args),
              "idle": idle, "flood": flooded, "target_ms": TARGET_S * 1e3, "met": worst <= TARGET_S * 1e3,
              "flood_over_idle_p99": {k: round(flooded[k]["p99_ms"] / max(idle[k]["p99_ms"], 1e-3), 2)
                                      for k in ("health_probe", "stream_gap")}}
    rows = [[name, str(r["clients"]), str(r["heavy_requests"]),
             *(f"{r[k]['p50_ms']} / {r[k]['p99_ms']} / {r[k]['max_ms']}" for k in ("health_probe", "stream_gap"))]
            for name, r in (("idle", idle), ("flood", flooded))]
    text = markdown_table(["phase", "flooding clients", "heavy requests", "health probe ms p50 / p99 / max",
                           "stream gap ms p50 / p99 / max"], rows)
    text += f"\n\nTarget: no probe or gap over {TARGET_S * 1e3:.0f} ms under the flood: {'met' if result['met'] else 'MISSED'}.\n"
    publish("input_flood", result, "Heavy input against health checks and other streams", text)


if __name__ == "__main__":
    run_benchmark(main)
