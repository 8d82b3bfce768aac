"""Seeded request workloads for the policy benchmark and the simulator (both replay the same ones).

A workload is a list of `Request`s: when it arrives, its prompt and output lengths (outputs are
forced: `ignore_eos` with `max_tokens`), and its priority. Lengths and arrivals are chosen
independently:

- lengths: `azure-conv` and `azure-code` (the Azure 2023 traces in ../shared/traces, Patel et
  al., ISCA 2024, CC-BY: read from there, never copied), `sharegpt` (ShareGPT-like:
  log-normal prompts and outputs around 300 and 250 tokens), `power-law-128/256/512` (Llumnix's
  generated lengths: a power law with that mean, capped at 6,144);
- arrivals: `trace` (the trace's own inter-arrival times, scaled to the target rate: azure
  lengths only), `poisson`, or `gamma-cvN` (Gamma with a coefficient of variation of N);
- priorities: a share of high-priority requests (`high_share`, priority -1; the rest 0). With
  `priorities=False` the same requests are marked `high` but all run at priority 0: the
  baseline the high-priority requests are compared with.

Every length is scaled by `length_scale` and clipped so that prompt + output fits `max_len`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
TRACE_FILES = {"azure-conv": "AzureLLMInferenceTrace_conv.csv", "azure-code": "AzureLLMInferenceTrace_code.csv"}
LENGTHS = ("azure-conv", "azure-code", "sharegpt", "power-law-128", "power-law-256", "power-law-512")
HIGH_PRIORITY = -1


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    high: bool = False  # one of the high-priority share (even when priorities are off)


@dataclass(frozen=True)
class WorkloadSpec:
    lengths: str = "sharegpt"
    arrivals: str = "poisson"  # poisson | gamma-cvN | trace
    rate: float = 1.0  # requests per second
    num_requests: int = 200
    high_share: float = 0.0
    priorities: bool = True
    length_scale: float = 1.0
    max_len: int = 4096
    seed: int = 0

    @property
    def label(self) -> str:
        prio = f", {self.high_share:.0%} high{'' if self.priorities else ' (priorities off)'}" if self.high_share else ""
        return f"{self.lengths} / {self.arrivals} @ {self.rate:g} req/s{prio}"


@cache
def _trace(name: str) -> tuple[tuple[float, int, int], ...]:
    """(seconds since the first request, prompt tokens, output tokens) of every trace row."""
    path = TRACES / TRACE_FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path}: the Azure traces are read from ../shared/traces beside the project")
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
            rows.append((stamp.timestamp(), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    start = rows[0][0]
    return tuple((t - start, p, o) for t, p, o in rows)


def _power_law(rng: random.Random, mean: float, cap: int = 6144, alpha: float = 1.5) -> int:
    """A Pareto length with the given mean (before the cap), at least 1."""
    minimum = mean * (alpha - 1) / alpha
    return max(1, min(cap, int(minimum / (1 - rng.random()) ** (1 / alpha))))


def _lengths(spec: WorkloadSpec, rng: random.Random) -> list[tuple[int, int]]:
    n = spec.num_requests
    if spec.lengths in TRACE_FILES:
        rows = _trace(spec.lengths)
        start = rng.randrange(0, max(1, len(rows) - n))
        return [(p, o) for _, p, o in rows[start:start + n]]
    if spec.lengths == "sharegpt":
        return [(int(rng.lognormvariate(math.log(300), 1.0)), int(rng.lognormvariate(math.log(250), 0.9)))
                for _ in range(n)]
    if spec.lengths.startswith("power-law-"):
        mean = float(spec.lengths.removeprefix("power-law-"))
        return [(_power_law(rng, mean), _power_law(rng, mean)) for _ in range(n)]
    raise ValueError(f"unknown lengths {spec.lengths!r} (one of {', '.join(LENGTHS)})")


def _gaps(spec: WorkloadSpec, rng: random.Random) -> list[float]:
    n = spec.num_requests
    if spec.arrivals == "trace":
        if spec.lengths not in TRACE_FILES:
            raise ValueError("trace arrivals need trace lengths (azure-conv or azure-code)")
        rows = _trace(spec.lengths)
        start = rng.randrange(0, max(1, len(rows) - n))
        times = [t for t, _, _ in rows[start:start + n]]
        gaps = [0.0] + [b - a for a, b in zip(times, times[1:])]
        scale = (sum(gaps) / max(1, n - 1)) * spec.rate  # mean gap -> 1 / rate
        return [g / scale for g in gaps] if scale else gaps
    if spec.arrivals == "poisson":
        return [0.0] + [rng.expovariate(spec.rate) for _ in range(n - 1)]
    if spec.arrivals.startswith("gamma-cv"):
        cv = float(spec.arrivals.removeprefix("gamma-cv"))
        shape = 1 / cv**2
        return [0.0] + [rng.gammavariate(shape, 1 / (spec.rate * shape)) for _ in range(n - 1)]
    raise ValueError(f"unknown arrivals {spec.arrivals!r} (poisson, gamma-cvN or trace)")


def generate(spec: WorkloadSpec) -> list[Request]:
    """The workload `spec` describes; the same spec always gives the same requests."""
    rng = random.Random(f"{spec.seed}:{spec.lengths}:{spec.arrivals}")
    lengths, gaps = _lengths(spec, rng), _gaps(spec, rng)
    requests, now = [], 0.0
    for (prompt, output), gap in zip(lengths, gaps):
        now += gap
        prompt = max(1, int(prompt * spec.length_scale))
        output = max(1, int(output * spec.length_scale))
        prompt = min(prompt, spec.max_len - 2)
        output = min(output, spec.max_len - prompt - 1)
        high = rng.random() < spec.high_share
        priority = HIGH_PRIORITY if high and spec.priorities else 0
        requests.append(Request(round(now, 6), prompt, max(1, output), priority, high))
    return requests


def add_sweep_arguments(parser: argparse.ArgumentParser, *, lengths: str, arrivals: str, rates: str,
                        requests: int, max_len: int) -> None:
    """The options that say which workloads a policy sweep replays (defaults per benchmark)."""
    parser.add_argument("--lengths", default=lengths, help=f"one of {', '.join(LENGTHS)}")
    parser.add_argument("--arrivals", default=arrivals, help="poisson, gamma-cvN or trace")
    parser.add_argument("--length-scale", type=float, default=1.0)
    parser.add_argument("--max-len", type=int, default=max_len)
    parser.add_argument("--rates", default=rates)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--high-share", type=float, default=0.0)
    parser.add_argument("--priority-baseline", action="store_true",
                        help="with --high-share, also run llumnix on the same requests with priorities off")


def sweep(args: argparse.Namespace, policies: list[str]) -> Iterator[tuple[str, WorkloadSpec]]:
    """(policy, workload) for every seed and rate of a sweep: each policy on the same requests,
    then, with --priority-baseline, llumnix on them with priorities off."""
    for seed in map(int, args.seeds.split(",")):
        for rate in map(float, args.rates.split(",")):
            spec = WorkloadSpec(args.lengths, args.arrivals, rate, args.requests, args.high_share,
                                length_scale=args.length_scale, max_len=args.max_len, seed=seed)
            yield from ((policy, spec) for policy in policies)
            if args.priority_baseline and args.high_share:
                yield "llumnix", dataclasses.replace(spec, priorities=False)
