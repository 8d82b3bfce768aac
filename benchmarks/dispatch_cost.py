"""What one scheduling decision costs: a dispatch per policy, and one rescheduling pass.

Pure policy code over synthetic snapshots (no engines): N instances with 128 requests each
(100 running, 28 waiting, mixed priorities, one in eight instances overloaded), 16-token blocks.

- `dispatch`: `choose_instance` over views the server already holds (each snapshot is looked at
  by many decisions until the next one arrives, every ~10 ms under load), two of them with a
  request dispatched but not yet reported;
- `dispatch_fresh`: the same with every snapshot just received (the worst case: one decision per
  snapshot, as at 64 instances each reporting every 10 ms). Snapshots arrive as the engines
  pickle them, with their request totals already summed in the engine process;
- `rescheduling`: one `plan_migrations` pass over fresh snapshots.

    python benchmarks/dispatch_cost.py [--instances 16,64,256] [--requests 128] [--repeats 2000]

Prints JSON and a table; writes docs/benchmarks/dispatch_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import pickle
import random
import sys
import time
from pathlib import Path

from llumnix_backend.config import DispatchPolicyName, MigrationSettings, PrioritySettings
from llumnix_backend.policies.dispatch import choose_instance
from llumnix_backend.policies.rescheduling import plan_migrations
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, RequestLoad

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, percentile, publish  # noqa: E402

BLOCK = 16
PRIORITY = PrioritySettings()


def snapshot(rng: random.Random, index: int, n_requests: int) -> InstanceSnapshot:
    n_waiting = n_requests // 5 + n_requests // 50
    running = tuple(RequestLoad(f"i{index}r{j}", rng.choice((-1, 0, 0, 0, 5)), t := rng.randint(20, 2000),
                                -(-t // BLOCK), decoding=True) for j in range(n_requests - n_waiting))
    waiting = tuple(RequestLoad(f"i{index}w{j}", 0, t := rng.randint(20, 2000), 0, -(-t // BLOCK))
                    for j in range(n_waiting))
    used = sum(r.num_blocks for r in running)
    total = used + (rng.randint(0, 200) if index % 8 else 0)  # every eighth instance is full
    return InstanceSnapshot(total, used, BLOCK, running=running, waiting=waiting)


def views(snapshots: list[InstanceSnapshot]) -> list[InstanceView]:
    pending = (RequestLoad("pending", 0, 300, 0, 19),)
    return [InstanceView(str(i), s.with_pending(pending) if i < 2 else s) for i, s in enumerate(snapshots)]


def fresh_copies(snapshots: list[InstanceSnapshot]) -> list[InstanceSnapshot]:
    """The snapshots as the front end receives them: unpickled, totals summed by the engine,
    nothing derived from them yet."""
    received = []
    for s in snapshots:
        sent = InstanceSnapshot(s.total_blocks, s.used_blocks, s.block_size, running=s.running, waiting=s.waiting)
        _ = sent.totals  # as the engine does before sending
        received.append(pickle.loads(pickle.dumps(sent)))
    return received


def timed(fn, repeats: int) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - began) * 1e6)
    return {"p50_us": round(percentile(samples, 50), 2), "p99_us": round(percentile(samples, 99), 2)}


def measure(n_instances: int, n_requests: int, repeats: int) -> list[dict]:
    rng = random.Random(n_instances)
    base = [snapshot(rng, i, n_requests) for i in range(n_instances)]
    held = views(base)
    rows = []
    for policy in DispatchPolicyName:
        choose_instance(policy, held, PRIORITY, "0")  # totals summed once, as the server does
        steady = timed(lambda: choose_instance(policy, held, PRIORITY, "0"), repeats)
        fresh_sets = [views(fresh_copies(base)) for _ in range(min(repeats, 200))]
        fresh = iter(fresh_sets * (repeats // len(fresh_sets) + 1))
        cold = timed(lambda: choose_instance(policy, next(fresh), PRIORITY, "0"), repeats)
        rows.append({"instances": n_instances, "requests_per_instance": n_requests, "what": "dispatch",
                     "policy": policy.value, **steady})
        rows.append({"instances": n_instances, "requests_per_instance": n_requests, "what": "dispatch_fresh",
                     "policy": policy.value, **cold})
    settings = MigrationSettings()
    passes = [views(fresh_copies(base)) for _ in range(min(repeats, 50))]
    fresh = iter(passes * (repeats // len(passes) + 1))
    rows.append({"instances": n_instances, "requests_per_instance": n_requests, "what": "rescheduling",
                 "policy": "llumnix", **timed(lambda: plan_migrations(next(fresh), PRIORITY, settings),
                                              max(50, repeats // 10))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", default="16,64,256")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--name", default="dispatch_cost")
    args = parser.parse_args()
    rows = [row for n in map(int, args.instances.split(",")) for row in measure(n, args.requests, args.repeats)]
    result = {"benchmark": "dispatch_cost", "command": command_line(), "rows": rows}
    table = markdown_table(["instances", "requests each", "what", "policy", "p50 (us)", "p99 (us)"],
                           [[str(r["instances"]), str(r["requests_per_instance"]), r["what"], r["policy"],
                             f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}"] for r in rows])
    publish(args.name, result, "Cost of a scheduling decision", table)


if __name__ == "__main__":
    main()
