"""Keep serving through engine deaths: streaming load on one model while a random instance's
engine is killed (SIGKILL) every `--kill-every-s` seconds.

One llumnix-serve with one model of `--instances` tiny instances (CPU) and rescheduling off,
so that only failures move requests. `--concurrency` greedy streams run at a time, each of a
random length, until `--duration-s` has passed or `--requests` were sent (both bounded). Each
stream is checked against the same request run undisturbed beforehand (token ids equal).

Reported: requests completed, failed and token-identical; replays, instance failures and
restarts (from /metrics); the longest pause any client saw between two tokens: over a kill
while another instance served (the replay case, the target's), over a kill of the only
instance serving (the others were still restarting: the streams wait for a restart), and
over no kill (the baseline); KV blocks left in use once the load is over. Prints JSON and a table; writes docs/benchmarks/NAME.{json,md}.

    python benchmarks/chaos.py [--instances 2] [--duration-s 600] [--kill-every-s 30]
        [--concurrency 4] [--requests 400] [--name chaos]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from llumnix_backend.tiny_models import TinyLlamaRecipe, ensure_model
from llumnix_server.launcher import llumnix_server, wait_for_repository

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, publish, run_benchmark  # noqa: E402

MODEL = "chaos"
PROMPTS = [f"Request {i} of the chaos run: keep streaming whatever happens to the engines. " for i in range(16)]


@dataclass(frozen=True)
class Kill:
    at: float  # time.monotonic()
    serving: int  # instances serving when it fired, the victim included


@dataclass
class Stream:
    prompt: int
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None


async def run_stream(client: httpx.AsyncClient, stream: Stream) -> Stream:
    body = {"model": MODEL, "prompt": PROMPTS[stream.prompt], "max_tokens": stream.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                stream.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return stream
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    stream.error = event["error"]["message"]
                    return stream
                for choice in event["choices"]:
                    if choice.get("token_ids"):
                        stream.token_ids += choice["token_ids"]
                        stream.arrivals.append(time.monotonic())
    except (httpx.HTTPError, TimeoutError) as exc:
        stream.error = repr(exc)
    return stream


def model_state(url: str) -> tuple[dict, str]:
    listing = httpx.get(f"{url}/v2/llumnix/models/{MODEL}/instances", timeout=30).json()
    return {i["id"]: i for i in listing["instances"]}, httpx.get(f"{url}/metrics", timeout=30).text


def counter(metrics: str, name: str) -> float:
    pattern = re.compile(rf'^llumnix:{name}_total\{{.*model_name="{MODEL}".*\}} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(metrics))


async def load(url: str, args, baselines: dict[tuple[int, int], list[int]], kills: list[Kill]) -> list[Stream]:
    rng = random.Random(args.seed)
    done: list[Stream] = []
    began = time.monotonic()
    sent = 0

    async def killer() -> None:
        krng = random.Random(args.seed + 1)
        while True:
            await asyncio.sleep(args.kill_every_s)
            serving = [i for i in model_state(url)[0].values() if i["state"] == "ready" and i["snapshot"]]
            if serving:
                victim = krng.choice(serving)
                with_pid = victim["snapshot"]["engine_pid"]
                print(f"  kill instance {victim['id']} (pid {with_pid}, {len(serving)} serving) at "
                      f"{time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
                os.kill(with_pid, signal.SIGKILL)
                kills.append(Kill(time.monotonic(), len(serving)))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() - began < args.duration_s and sent < args.requests:
            sent += 1
            key = rng.choice(sorted(baselines))
            done.append(await run_stream(client, Stream(*key)))

    killing = asyncio.create_task(killer())
    try:
        async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout_s) as client:
            await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    finally:
        killing.cancel()
    return done


async def undisturbed(url: str, keys: list[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        runs = [await run_stream(client, Stream(*key)) for key in keys]
    for run in runs:
        if run.error:
            raise RuntimeError(f"the undisturbed run failed: {run.error}")
    return {(r.prompt, r.max_tokens): r.token_ids for r in runs}


def longest_pauses(streams: list[Stream], kills: list[Kill]) -> dict[str, float]:
    """The longest pause between two tokens: over a kill with another instance serving, over a
    kill of the last one serving, over no kill. A pause is over a kill if the kill fired
    between its two tokens."""
    longest = {"replayed": 0.0, "last_instance_killed": 0.0, "no_kill": 0.0}
    for stream in streams:
        for before, after in zip(stream.arrivals, stream.arrivals[1:]):
            over = [k for k in kills if before <= k.at <= after]
            case = "no_kill" if not over else "replayed" if min(k.serving for k in over) > 1 else "last_instance_killed"
            longest[case] = max(longest[case], after - before)
    return longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--kill-every-s", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--lengths", default="200,400,800", help="output lengths the requests draw from")
    parser.add_argument("--request-timeout-s", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="chaos")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    keys = [(p, n) for p in range(4) for n in lengths]
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = Path(tmp)
        folder = work / "repository" / MODEL
        folder.mkdir(parents=True)
        model = ensure_model(work / "model", TinyLlamaRecipe(seed=0))
        config = {"instances": args.instances,
                  "engine": {"model": str(model), "max_model_len": 2048, "enforce_eager": True, "dtype": "float32"},
                  "resources": {"cpu_kv_cache_gib": 0.25, "cpu_threads": 1},
                  "scheduler": {"migration": {"rescheduling": False}}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        server = llumnix_server(work / "repository", work / "server.log", extra_args=("--log-level", "warning"))
        server.start()
        try:
            wait_for_repository(server, 600)
            baselines = asyncio.run(undisturbed(server.url, keys))
            kills: list[Kill] = []
            began = time.monotonic()
            streams = asyncio.run(load(server.url, args, baselines, kills))
            elapsed = time.monotonic() - began
            # Once every lost instance is back, nothing may hold KV blocks.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                states, metrics = model_state(server.url)
                if all(i["state"] == "ready" and i["snapshot"] and not i["snapshot"]["running"]
                       and not i["snapshot"]["waiting"] for i in states.values()):
                    break
                time.sleep(0.5)
            leaked = sum(i["snapshot"]["used_blocks"] for i in states.values() if i["snapshot"])
        finally:
            server.stop()
    failed = [s for s in streams if s.error or len(s.token_ids) != s.max_tokens]
    identical = sum(1 for s in streams if not s.error and s.token_ids == baselines[(s.prompt, s.max_tokens)])
    pauses = longest_pauses(streams, kills)
    result = {"benchmark": "chaos", "command": command_line(), "settings": vars(args), "elapsed_s": elapsed,
              "requests": len(streams), "completed": len(streams) - len(failed), "failed": len(failed),
              "token_identical": identical, "kills": len(kills),
              "kills_of_the_last_serving_instance": sum(k.serving == 1 for k in kills),
              "replays": counter(metrics, "replays"), "instance_failures": counter(metrics, "instance_failures"),
              "instance_restarts": counter(metrics, "instance_restarts"),
              "longest_pause_over_a_replay_s": pauses["replayed"],
              "longest_pause_over_a_kill_of_the_last_instance_s": pauses["last_instance_killed"],
              "longest_pause_over_no_kill_s": pauses["no_kill"], "kv_blocks_left_in_use": leaked,
              "failures": [s.error or f"{len(s.token_ids)} of {s.max_tokens} tokens" for s in failed][:10]}
    rows = [[k, f"{v:.3f}" if isinstance(v, float) else str(v)] for k, v in result.items()
            if k not in ("command", "settings", "benchmark", "failures")]
    publish(args.name, result, "Chaos: engines killed under streaming load", markdown_table(["figure", "value"], rows))


if __name__ == "__main__":
    run_benchmark(main)
