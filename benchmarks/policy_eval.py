"""Does Llumnix's scheduling pay off? Every dispatch policy on the same engines and workloads.

One llumnix-serve with one model of N instances. For each workload seed and rate, every policy
replays the same seeded requests (arrival times, prompt and output lengths, priorities; see
`workloads.py`), streaming, each request's output forced to its length. Policies are switched by
rewriting the model's `scheduler` section, which the server applies in place (the engines keep
running); the next run starts once the new policy shows in `/instances` and no request runs.

Policies: `round_robin`, `queue`, `kv_usage`, `llumnix-norescheduling` (llumnix dispatch only)
and `llumnix` (dispatch plus continuous rescheduling by live migration).

    python benchmarks/policy_eval.py [--shape tiny|llama-2-7b] [--instances 4] [--blocks 127]
        [--lengths sharegpt] [--arrivals poisson] [--rates 2,3] [--requests 120] [--seeds 0,1]
        [--high-share 0.1 [--priority-baseline]] [--policies ...] [--name policy_eval]
        [--step-trace DIR]

Reported per run: mean and P99 TTFT, P99 time between tokens, end-to-end latency, throughput,
preemptions (from the instances' snapshots) and committed migrations (from /metrics), for all
requests and, with --high-share, for the high-priority and normal ones apart. With
--priority-baseline the high-priority share is also run with priorities off (the same requests,
all at priority 0) under llumnix: the reference for the high-priority target. Prints JSON and a
table; writes docs/benchmarks/NAME.{json,md,png}. `--step-trace DIR` makes every engine write
its steps there (for `step_profile.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from llumnix_backend.config import PrioritySettings
from llumnix_backend.tiny_models import LLAMA_2_7B_BLOCK_BYTES, TinyLlamaRecipe, ensure_model, write_llama_2_7b_shape
from llumnix_server.launcher import llumnix_server, wait_for_repository

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, run_benchmark  # noqa: E402
from policy_report import Outcome, RunSummary, plot, summarize, table  # noqa: E402
from workloads import WorkloadSpec, add_sweep_arguments, generate, sweep  # noqa: E402

MODEL = "bench"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
POLICIES = ("round_robin", "queue", "kv_usage", "llumnix-norescheduling", "llumnix")
TINY_BLOCK_BYTES = 256 * 1024  # the tiny model's KV per 128-token block (bf16, 2 layers)
TINY_VOCAB = 320


def scheduler_section(policy: str, args) -> dict:
    dispatch = policy.removesuffix("-norescheduling")
    return {"dispatch_policy": dispatch,
            "priority": {"high_below": 0, "headroom_tokens": args.headroom_tokens},
            "migration": {"rescheduling": policy == "llumnix"}}


def model_config(work: Path, args) -> dict:
    engine = {"max_model_len": args.max_len, "max_num_seqs": args.max_num_seqs}
    if args.shape == "tiny":
        engine |= {"model": str(ensure_model(work / "model", TinyLlamaRecipe(seed=0))), "enforce_eager": True}
        resources = {"cpu_kv_cache_gib": (args.blocks + 1) * TINY_BLOCK_BYTES / 2**30, "cpu_threads": 1}
    else:
        engine |= {"model": str(write_llama_2_7b_shape(work / "model")), "load_format": "dummy",
                   "num_gpu_blocks_override": args.blocks}
        # The KV cache's size given (the blocks, and the null block): the engines start together.
        resources = {"gpu_memory_utilization": args.gpu_memory_utilization,
                     "gpu_kv_cache_gib": (args.blocks + 1) * LLAMA_2_7B_BLOCK_BYTES / 2**30}
    return {"instances": args.instances, "engine": engine, "resources": resources,
            "scheduler": scheduler_section(POLICIES[0], args)}


class Bench:
    def __init__(self, work: Path, args) -> None:
        self.args = args
        self.folder = work / "repository" / MODEL
        self.folder.mkdir(parents=True)
        self.config = model_config(work, args)
        (self.folder / "config.yaml").write_text(yaml.safe_dump(self.config))
        env = {"LLUMNIX_STEP_TRACE_DIR": str(Path(args.step_trace).resolve())} if args.step_trace else {}
        log = Path(args.server_log) if args.server_log else work / "server.log"
        self.server = llumnix_server(work / "repository", log, extra_args=("--log-level", "warning"))
        self.server.env.update(env)

    def __enter__(self) -> Bench:
        self.server.start()
        wait_for_repository(self.server, 900)
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    def instances(self) -> dict:
        return httpx.get(f"{self.server.url}/v2/llumnix/models/{MODEL}/instances", timeout=30).json()

    def use_policy(self, policy: str) -> None:
        """Rewrite the scheduler section and wait for the server to apply it and go idle."""
        self.config["scheduler"] = scheduler_section(policy, self.args)
        (self.folder / "config.yaml").write_text(yaml.safe_dump(self.config))
        want = (policy.removesuffix("-norescheduling"), policy == "llumnix")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listing = self.instances()
            # A run on fewer instances than the others would compare nothing: stop the sweep.
            broken = [f"instance {i['id']}: {i['state']} {i['error'] or ''}" for i in listing["instances"]
                      if i["state"] != "ready"]
            if broken:
                raise RuntimeError(f"not every instance serves, the sweep stops: {'; '.join(broken)}")
            if ((listing["dispatch_policy"], listing["rescheduling"]["enabled"]) == want
                    and not any(i["snapshot"]["running"] or i["snapshot"]["waiting"] for i in listing["instances"])):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the server did not switch to {policy} within 120 s")

    def counters(self) -> tuple[int, int]:
        """(preemptions, committed migrations) so far."""
        preemptions = sum(i["snapshot"]["num_preemptions"] for i in self.instances()["instances"])
        text = httpx.get(f"{self.server.url}/metrics", timeout=30).text
        pattern = re.compile(rf'^llumnix:migrations_committed_total\{{.*model_name="{MODEL}".*\}} (\S+)$', re.M)
        return preemptions, int(sum(float(v) for v in pattern.findall(text)))


async def one_request(client: httpx.AsyncClient, request, index: int, seed: int, began: float,
                      timeout: float) -> Outcome:
    rng = random.Random(f"{seed}:{index}")  # distinct prompts: no prefix-cache hits between requests
    prompt = [rng.randrange(3, TINY_VOCAB) for _ in range(request.prompt_tokens)]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": request.output_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "priority": request.priority, "return_token_ids": True}
    await asyncio.sleep(max(0.0, began + request.arrival_s - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    try:
        async with asyncio.timeout(timeout), client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return Outcome(0, 0, 0, (), request.high, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                n = sum(len(c.get("token_ids") or []) for c in choices)
                if not n:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                    gaps.extend([0.0] * (n - 1))
                last = now
                tokens += n
    except (httpx.HTTPError, TimeoutError) as exc:
        return Outcome(0, 0, tokens, (), request.high, repr(exc))
    if first is None or tokens != request.output_tokens:
        return Outcome(0, 0, tokens, (), request.high, f"{tokens} of {request.output_tokens} tokens")
    return Outcome(first - sent, last - sent, tokens, tuple(gaps), request.high)


async def replay(base_url: str, requests, seed: int, timeout: float) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        began = time.perf_counter()
        outcomes = await asyncio.gather(*(one_request(client, r, i, seed, began, timeout)
                                          for i, r in enumerate(requests)))
        return list(outcomes), time.perf_counter() - began


def run_policy(bench: Bench, policy: str, spec: WorkloadSpec) -> RunSummary:
    bench.use_policy(policy)
    before = bench.counters()
    outcomes, duration = asyncio.run(replay(bench.server.url, generate(spec), spec.seed, bench.args.request_timeout))
    after = bench.counters()
    label = policy if spec.priorities else f"{policy} (priorities off)"
    summary = summarize(label, spec.label.split(" @")[0], spec.rate, spec.seed, outcomes,
                        after[0] - before[0], after[1] - before[1], duration)
    print(f"  {policy:24s} rate {spec.rate:g} seed {spec.seed}: p99 ttft "
          f"{summary.figures.get('all', {}).get('p99_ttft_s', float('nan')):.2f} s, failed {summary.failed}, "
          f"preemptions {summary.preemptions}, migrations {summary.migrations}", file=sys.stderr, flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "llama-2-7b"), default="tiny")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=127, help="KV blocks per instance")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    add_sweep_arguments(parser, lengths="sharegpt", arrivals="poisson", rates="2,3", requests=120, max_len=2048)
    parser.add_argument("--headroom-tokens", type=int, default=PrioritySettings().headroom_tokens)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--name", default="policy_eval")
    parser.add_argument("--step-trace")
    parser.add_argument("--server-log", help="keep the server's log there (default: dropped with the run)")
    args = parser.parse_args()
    policies = args.policies.split(",")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    summaries: list[RunSummary] = []
    with tempfile.TemporaryDirectory(prefix="policy-eval-") as tmp, Bench(Path(tmp), args) as bench:
        for policy, spec in sweep(args, policies):
            summaries.append(run_policy(bench, policy, spec))
            report(summaries, args, final=False)  # kept as it goes: a long run may be cut short
    report(summaries, args, final=True)


def report(summaries: list[RunSummary], args, final: bool) -> None:
    result = {"benchmark": "policy_eval", "command": command_line(), "complete": final,
              "settings": {k: v for k, v in vars(args).items() if k != "name"},
              "runs": [s.row(k) for s in summaries for k in s.figures]}
    text = table(summaries)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (DOCS / f"{args.name}.md").write_text(f"# Policy evaluation: {args.shape}, {args.instances} instances\n\n"
                                          f"    {result['command']}\n\n{text}\n")
    if final:
        print(json.dumps(result, indent=2))
        print(text)
        plot(summaries, DOCS / f"{args.name}.png", f"{args.lengths} / {args.arrivals}, {args.instances} instances "
                                                   f"of {args.shape}, {args.blocks} KV blocks each")

if __name__ == "__main__":
    run_benchmark(main)
