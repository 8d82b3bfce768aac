"""The policy benchmark on the simulator: the same workloads and table as `policy_eval.py`, at
any number of instances (Llumnix's paper studies 16). It is a simulator (see
`llumnix_backend/simulator`): its figures are the model's, checked against real runs with
`--compare`.

    python benchmarks/simulate.py [--profile cpu-tiny] [--instances 16] [--lengths azure-conv]
        [--arrivals trace] [--rates 20,30] [--requests 2000] [--seeds 0,1] [--high-share 0.1]
        [--policies ...] [--migration KEY=VALUE ...] [--name simulate]
        [--compare docs/benchmarks/policy_eval_cpu.json] [--defers-frees]

`--compare REAL.json` runs the settings of a `policy_eval.py` report instead (its instances,
workload, rates and seeds) and prints, per run, the simulated over the real P50 and P99 TTFT
and preemptions. `--defers-frees` models engines that return a preempted request's blocks only
after the next step, as vLLM 0.26 did under async scheduling with Llumnix's connector before
the engines stopped deferring. Prints JSON and a table; writes docs/benchmarks/NAME.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

from llumnix_backend.config import DispatchPolicyName, MigrationSettings, PrioritySettings, SchedulerSettings
from llumnix_backend.simulator import Simulation, load_profile

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, publish  # noqa: E402
from policy_eval import POLICIES  # noqa: E402
from policy_report import Outcome, RunSummary, plot, summarize, table  # noqa: E402
from workloads import WorkloadSpec, add_sweep_arguments, generate, sweep  # noqa: E402



def scheduler(policy: str, headroom_tokens: int, migration: dict) -> SchedulerSettings:
    return SchedulerSettings(dispatch_policy=DispatchPolicyName(policy.removesuffix("-norescheduling")),
                             priority=PrioritySettings(high_below=0, headroom_tokens=headroom_tokens),
                             migration=MigrationSettings(**{**migration, "rescheduling": policy == "llumnix"}))


def simulate(profile, instances: int, policy: str, spec: WorkloadSpec, headroom_tokens: int,
             migration: dict) -> tuple[RunSummary, float]:
    requests = generate(spec)
    began = time.perf_counter()
    result = Simulation(profile, instances, scheduler(policy, headroom_tokens, migration)).run(requests)
    elapsed = time.perf_counter() - began
    high = {f"r{i}": r.high for i, r in enumerate(requests)}
    outcomes = [Outcome(r.first_token_at - r.arrival, r.finished_at - r.arrival, r.generated, tuple(r.token_gaps),
                        high[r.request_id])
                if r.finished_at is not None else Outcome(0, 0, r.generated, (), high[r.request_id], "unfinished")
                for r in result.requests]
    duration = max((r.finished_at or 0) for r in result.requests) - min(r.arrival for r in result.requests)
    label = policy if spec.priorities else f"{policy} (priorities off)"
    return summarize(label, spec.label.split(" @")[0], spec.rate, spec.seed, outcomes, result.num_preemptions,
                     result.migrations["committed"], duration), elapsed


def compare(real_path: Path, profile, headroom_tokens: int, migration: dict) -> tuple[list[RunSummary], list[list[str]]]:
    real = json.loads(real_path.read_text())
    s = real["settings"]
    profile = dataclasses.replace(profile, total_blocks=s["blocks"], max_num_seqs=s["max_num_seqs"])
    summaries, rows = [], []
    for run in (r for r in real["runs"] if r["class"] == "all" and "priorities off" not in r["policy"]):
        spec = WorkloadSpec(s["lengths"], s["arrivals"], run["rate"], s["requests"], s["high_share"],
                            length_scale=s["length_scale"], max_len=s["max_len"], seed=run["seed"])
        # The real run's headroom, whatever today's default (older reports ran with 1,024).
        summary, _ = simulate(profile, s["instances"], run["policy"], spec, s.get("headroom_tokens", headroom_tokens),
                              migration)
        summaries.append(summary)
        sim = summary.row()
        ratio = lambda key: f"{sim[key] / run[key]:.2f}" if run.get(key) else "-"  # noqa: E731
        rows.append([run["policy"], f"{run['rate']:g}", str(run["seed"]),
                     f"{run['p50_ttft_s']:.3f} / {sim['p50_ttft_s']:.3f}", ratio("p50_ttft_s"),
                     f"{run['p99_ttft_s']:.3f} / {sim['p99_ttft_s']:.3f}", ratio("p99_ttft_s"),
                     f"{run['preemptions']} / {sim['preemptions']}", ratio("preemptions")])
    return summaries, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--blocks", type=int, help="KV blocks per instance (default: the profile's)")
    add_sweep_arguments(parser, lengths="azure-conv", arrivals="trace", rates="20", requests=2000, max_len=8192)
    parser.add_argument("--headroom-tokens", type=int, default=PrioritySettings().headroom_tokens)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--name", default="simulate")
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--migration", action="append", default=[], metavar="KEY=VALUE",
                        help="a scheduler.migration setting for llumnix (repeatable), e.g. max_in_flight_per_instance=4")
    parser.add_argument("--defers-frees", action="store_true",
                        help="model vLLM 0.26's deferred block frees under async scheduling with a loading KV "
                             "connector (EngineProfile.defers_frees)")
    args = parser.parse_args()
    migration = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.migration)}
    profile = load_profile(args.profile)
    if args.blocks:
        profile = dataclasses.replace(profile, total_blocks=args.blocks)
    if args.defers_frees:
        profile = dataclasses.replace(profile, defers_frees=True)
    result = {"benchmark": "simulate", "simulator": True, "command": command_line(), "profile": profile.name,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "name"}}
    extra = ""
    if args.compare:
        summaries, rows = compare(args.compare, profile, args.headroom_tokens, migration)
        extra = "\n\nSimulated against real (real / simulated, and their ratio):\n\n" + markdown_table(
            ["policy", "rate", "seed", "P50 TTFT s", "ratio", "P99 TTFT s", "ratio", "preemptions", "ratio"], rows)
        result["comparison"] = rows
    else:
        summaries, timings = [], []
        for policy, spec in sweep(args, args.policies.split(",")):
            summary, elapsed = simulate(profile, args.instances, policy, spec, args.headroom_tokens, migration)
            summaries.append(summary)
            timings.append({"policy": summary.policy, "rate": spec.rate, "seed": spec.seed, "wall_s": round(elapsed, 2)})
            print(f"  {summary.policy:24s} rate {spec.rate:g} seed {spec.seed}: {elapsed:.1f} s", file=sys.stderr)
        result["wall_time"] = timings
    result["runs"] = [s.row(k) for s in summaries for k in s.figures]
    png = publish(args.name, result, f"Simulated policy evaluation (simulator, profile {profile.name}, "
                                     f"{args.instances} instances)", table(summaries) + extra)
    plot(summaries, png,
         f"SIMULATED: {args.lengths} / {args.arrivals}, {args.instances} instances, profile {profile.name}")


if __name__ == "__main__":
    main()
