"""Live-migration downtime against recomputation, for sequences of 128 to 4096 tokens.

One llumnix-serve with a model of two instances. For each sequence length L:

- migration: a streaming request whose sequence has reached L tokens is migrated to the other
  instance; downtime is the pause its client sees between the source's last token and the
  destination's first (and the server's own figure for it); separately, the longest pause
  the client saw before the switch, while the earlier stages copied;
- recompute baseline: what migrating by recomputation costs, i.e. the time to first token of
  an L-token prompt on an idle instance with nothing cached (abort on the source, prefill the
  prompt plus generated tokens on the destination).

Each point is the median of --repeats runs, all in one process on the same two instances.
Every migrated stream (greedy) is also run again unmigrated, and the table says how many were
token-identical to it.

With `--network`, the same measurements run twice more in the same process, on a Ray cluster of
two nodes started on this host (`ray.cluster_utils`): once with one instance on each node, where
the KV travels over the network transport (Ray's object store between the nodes), and once with
both instances on one node (`placement: pack`), where it takes the local path but every control
call and token crosses Ray as it does between nodes. The report gives both over the local path's
figures, length by length: what the transport costs apart from what Ray's calls cost.

    python benchmarks/migration_downtime.py [--lengths 128,256,512,1024,2048,4096] [--repeats 5]
        [--shape tiny|llama-2-7b] [--gpu-kv-cache-gib G] [--dtype float32] [--no-async-scheduling]
        [--network] [--name migration]

`--shape tiny` (default) runs the generated 2-layer model on the CPU; `--shape llama-2-7b` runs
Llama-2-7B's architecture with dummy weights (GPU: both instances share one GPU by
`--gpu-memory-utilization` each). Prints JSON and a table; writes
docs/benchmarks/NAME.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from llumnix_backend.tiny_models import TinyLlamaRecipe, ensure_model, write_llama_2_7b_shape
from llumnix_server.launcher import ServerProcess, llumnix_server, wait_for_repository

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, run_benchmark  # noqa: E402

MODEL = "bench"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
# Tokens generated before the migration starts.
DECODE_BEFORE = 16
SHAPES = {"tiny": "tiny llama (2 layers, hidden 256), 2 instances",
          "llama-2-7b": "Llama-2-7B shape, dummy weights, 2 instances"}


def model_config(work: Path, args, max_len: int) -> dict:
    if args.shape == "tiny":
        model_dir = ensure_model(work / "model", TinyLlamaRecipe(seed=0))
        config = {"engine": {"model": str(model_dir), "max_model_len": max_len, "enforce_eager": True},
                  "resources": {"cpu_kv_cache_gib": args.kv_cache_gib}}
    else:
        model_dir = write_llama_2_7b_shape(work / "model")
        config = {"engine": {"model": str(model_dir), "load_format": "dummy", "max_model_len": max_len},
                  "resources": {"gpu_memory_utilization": args.gpu_memory_utilization}}
        if args.gpu_kv_cache_gib:
            config["resources"]["gpu_kv_cache_gib"] = args.gpu_kv_cache_gib
    if args.dtype:
        config["engine"]["dtype"] = args.dtype
    if args.no_async_scheduling:
        config["engine"]["async_scheduling"] = False
    return config


def start_server(work: Path, config: dict, transport: str, log: Path | None,
                 ray_address: str | None = None, placement: str = "spread") -> ServerProcess:
    (work / "repository" / MODEL).mkdir(parents=True, exist_ok=True)
    migration = {"rescheduling": False, "transport": transport}  # only the benchmark migrates
    config = {"instances": 2, **config, "scheduler": {"dispatch_policy": "llumnix", "migration": migration}}
    config["resources"] = {**config["resources"], "placement": placement}
    (work / "repository" / MODEL / "config.yaml").write_text(yaml.safe_dump(config))
    extra = ("--log-level", "warning", *(("--ray-address", ray_address) if ray_address else ()))
    server = llumnix_server(work / "repository", log or work / "server.log", extra_args=extra)
    server.start()
    try:
        wait_for_repository(server, 300)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def two_node_cluster() -> Iterator[str]:
    """A Ray cluster of two nodes on this host (each its own raylet and object store); its address."""
    from ray.cluster_utils import Cluster

    resources = {"num_cpus": os.cpu_count(), "num_gpus": device_count(), "object_store_memory": 4 << 30}
    cluster = Cluster(initialize_head=True, head_node_args=resources)
    try:
        cluster.add_node(**resources)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


class TimedStream:
    """A streaming completion read on a thread, recording when each token arrived."""

    def __init__(self, server: ServerProcess, prompt: list[int], max_tokens: int) -> None:
        self.arrivals: list[float] = []
        self.token_ids: list[int] = []
        self.request_id: str | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(server, prompt, max_tokens), daemon=True)
        self._thread.start()

    def _read(self, server: ServerProcess, prompt: list[int], max_tokens: int) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                now = time.monotonic()
                self.request_id = event["id"]
                for choice in event["choices"]:
                    self.arrivals += [now] * len(choice.get("token_ids") or [])
                    self.token_ids += choice.get("token_ids") or []
                if len(self.arrivals) >= DECODE_BEFORE:
                    self._started.set()

    def wait_decoding(self) -> None:
        assert self._started.wait(120), "the request never started decoding"

    def join(self) -> None:
        self._thread.join(300)

    def switch_gap(self, switched_at_token: int) -> float:
        """The pause before the destination's first token (generated token `switched_at_token`)."""
        return self.arrivals[switched_at_token] - self.arrivals[switched_at_token - 1]

    def longest_gap(self, start: float, switched_at_token: int) -> float:
        """The longest pause between tokens that arrived from `start` on, before the switch:
        how much the earlier stages stalled the source."""
        times = [t for t in self.arrivals[:switched_at_token] if t >= start]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def typical_gap(self, start: float) -> float:
        """The median pause between tokens before `start`: the stream's pace without migration."""
        times = [t for t in self.arrivals if t < start]
        return statistics.median(b - a for a, b in zip(times, times[1:]))


def instance_of(server: ServerProcess, request_id: str) -> str:
    instances = httpx.get(server.url + f"/v2/llumnix/models/{MODEL}/instances", timeout=10).json()["instances"]
    for instance in instances:
        if request_id in [r["request_id"] for r in instance["snapshot"]["running"]]:
            return instance["id"]
    raise RuntimeError(f"request {request_id} is not running")


class MigrationNotCommitted(RuntimeError):
    pass


def measure_migration(server: ServerProcess, prompt: list[int], decode_after: int) -> dict:
    stream = TimedStream(server, prompt, DECODE_BEFORE + decode_after)
    stream.wait_decoding()
    source = instance_of(server, stream.request_id)
    began = time.monotonic()
    report = httpx.post(server.url + f"/v2/llumnix/models/{MODEL}/migrate", timeout=120,
                        json={"request_id": stream.request_id, "to": {"0": "1", "1": "0"}[source]}).json()
    stream.join()
    if not report.get("committed"):
        raise MigrationNotCommitted(f"migration not committed: {report}")
    switched = report["switched_at_token"]
    wait_idle(server)
    undisturbed = TimedStream(server, prompt, DECODE_BEFORE + decode_after)
    undisturbed.join()
    return {"token_identical": stream.token_ids == undisturbed.token_ids,
            "client_downtime_s": stream.switch_gap(switched), "inter_token_s": stream.typical_gap(began),
            "stage_stall_s": stream.longest_gap(began, switched), "server_downtime_s": report["downtime_s"],
            "final_copy_s": report["final_copy_s"],
            "total_s": report["duration_s"], "stages": report["stages"], "blocks": report["blocks"],
            "recomputed_tokens": report["recomputed_tokens"]}


def measure_recompute(server: ServerProcess, prompt: list[int]) -> float:
    """Time to first token of `prompt` on an idle instance, nothing of it cached."""
    began = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0.0,
    }) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                return time.monotonic() - began
    raise RuntimeError("no token")


def wait_idle(server: ServerProcess) -> None:
    for _ in range(200):
        instances = httpx.get(server.url + f"/v2/llumnix/models/{MODEL}/instances", timeout=10).json()["instances"]
        if all(not i["snapshot"]["running"] and not i["snapshot"]["waiting"] for i in instances):
            return
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", choices=["tiny", "llama-2-7b"], default="tiny")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="per instance, CPU engines")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.42, help="per instance, GPU engines")
    parser.add_argument("--gpu-kv-cache-gib", type=float,
                        help="per instance, GPU engines: a fixed KV cache instead of one sized by profiling, so "
                             "that engines may start together (with --network, the two Ray nodes share the GPU)")
    parser.add_argument("--transport", choices=["auto", "host", "device"], default="auto",
                        help="how KV blocks travel on one host (auto: device on GPU, host on CPU)")
    parser.add_argument("--network", action="store_true",
                        help="then measure again between two Ray nodes on this host (the network transport)")
    parser.add_argument("--decode-after", type=int, default=128,
                        help="tokens the request may still generate once the migration starts: it must "
                             "outlive the migration (the host path on GPU copies for seconds)")
    parser.add_argument("--dtype", help="the engines' dtype (default: vLLM's choice for the model)")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="turn vLLM's async scheduling off (on GPU it is on by default)")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    parser.add_argument("--name", default="migration", help="file name of the figures in --out")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)

    def random_prompt(n: int) -> list[int]:  # fresh tokens every time: nothing hits a prefix cache
        return [rng.randrange(3, 259) for _ in range(n)]

    def measure(work: Path, ray_address: str | None = None, placement: str = "spread") -> dict[int, dict]:
        rows = {}
        server = start_server(work, model_config(work, args, max(lengths) + args.decode_after + 64), args.transport,
                              args.server_log, ray_address, placement)
        try:
            # Warm both instances up. The first migration also opens the transfer segments, which
            # may take longer than a short request lasts: whether it commits does not count.
            with contextlib.suppress(MigrationNotCommitted):
                measure_migration(server, random_prompt(min(lengths) - DECODE_BEFORE), args.decode_after)
            wait_idle(server)
            for length in lengths:
                # A migration that does not commit (the request finished first, say) is counted,
                # not fatal: the other lengths' figures still get written.
                migrations, recomputes, failures = [], [], []
                for _ in range(args.repeats):
                    try:
                        migrations.append(measure_migration(server, random_prompt(length - DECODE_BEFORE),
                                                            args.decode_after))
                    except MigrationNotCommitted as exc:
                        failures.append(str(exc))
                    wait_idle(server)
                    recomputes.append(measure_recompute(server, random_prompt(length)))
                    wait_idle(server)
                rows[length] = summarize(migrations, recomputes, failures)
                print(f"{work.name}, {length} tokens: {rows[length]}", file=sys.stderr)
        finally:
            server.stop()
        return rows

    with tempfile.TemporaryDirectory(prefix="llumnix-migration-") as tmp:
        rows = measure(Path(tmp) / "local")
        ray_rows = None
        if args.network:
            with two_node_cluster() as address:
                ray_rows = {"network": measure(Path(tmp) / "network", address),
                            "one_node": measure(Path(tmp) / "ray-one-node", address, placement="pack")}
    report = build_report(rows, args, ray_rows)
    print(json.dumps(report, indent=2))
    print(report_table(report))
    write_docs(report, args.out, args.name)


def summarize(migrations: list[dict], recomputes: list[float], failures: list[str]) -> dict:
    """Medians over the migrations that committed; with none, only the counts and why."""
    def median(key: str) -> float:
        return statistics.median(m[key] for m in migrations)

    counts = {"committed": f"{len(migrations)}/{len(migrations) + len(failures)}",
              **({"failure": failures[-1]} if failures else {})}
    if not migrations:
        return {**counts, "recompute_ms": statistics.median(recomputes) * 1000}
    return {
        **counts,
        "client_downtime_ms": median("client_downtime_s") * 1000,
        "inter_token_ms": median("inter_token_s") * 1000,
        "stage_stall_ms": median("stage_stall_s") * 1000,
        "server_downtime_ms": median("server_downtime_s") * 1000,
        "final_copy_ms": median("final_copy_s") * 1000,
        "migration_total_ms": median("total_s") * 1000,
        "stages": median("stages"),
        "blocks": median("blocks"),
        "recomputed_tokens": max(m["recomputed_tokens"] for m in migrations),
        "recompute_ms": statistics.median(recomputes) * 1000,
        "token_identical": f"{sum(m['token_identical'] for m in migrations)}/{len(migrations)}",
    }


def build_report(rows: dict[int, dict], args, ray_rows: dict[str, dict[int, dict]] | None = None) -> dict:
    lengths = sorted(rows)
    short, long = rows[lengths[0]], rows[lengths[-1]]
    flat = ratio(long, short, "client_downtime_ms")
    versus = ratio(long, long, "client_downtime_ms", "recompute_ms")
    report = {
        "benchmark": "migration_downtime",
        "command": command_line(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "settings": {"repeats": args.repeats, "decode_after": args.decode_after, "model": SHAPES[args.shape], "device": device_name(),
                     "transport": args.transport, "dtype": args.dtype or "the model's",
                     "async_scheduling": not args.no_async_scheduling,
                     **({"kv_cache_gib": args.kv_cache_gib} if args.shape == "tiny"
                        else {"gpu_memory_utilization": args.gpu_memory_utilization})},
        "results": {str(k): rows[k] for k in lengths},
        "comparison": {
            f"downtime_{lengths[-1]}_over_{lengths[0]}": flat,
            f"downtime_over_recompute_at_{lengths[-1]}": versus,
        },
        "targets": {
            "downtime_longest_over_shortest_at_most": 2.0,
            "downtime_over_recompute_at_longest_at_most": 0.2,
            "met": flat is not None and versus is not None and flat <= 2.0 and versus <= 0.2,
        },
    }
    if ray_rows is not None:
        # On the Ray cluster, each placement against the local path (`--transport`), length by length.
        for key, placed in ray_rows.items():
            report[key] = {"results": {str(k): placed[k] for k in lengths},
                           "over_local": {str(k): {"downtime_over_local": ratio(placed[k], rows[k], "client_downtime_ms"),
                                                   "total_over_local": ratio(placed[k], rows[k], "migration_total_ms")}
                                          for k in lengths}}
        report["network"]["downtime_over_one_node"] = {
            str(k): ratio(ray_rows["network"][k], ray_rows["one_node"][k], "client_downtime_ms") for k in lengths}
        report["targets"]["network_downtime_over_local_at_longest_at_most"] = 2.0
        at_longest = report["network"]["over_local"][str(lengths[-1])]["downtime_over_local"]
        report["targets"]["network_met"] = at_longest is not None and at_longest <= 2.0
    return report


def ratio(row: dict, base: dict, key: str, base_key: str | None = None) -> float | None:
    """row[key] / base[base_key or key]; None where either length has no committed migration."""
    top, bottom = row.get(key), base.get(base_key or key)
    return None if top is None or bottom is None else top / bottom


def cell(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def series(rows: list[dict], key: str) -> list[float]:
    """A plotted line's values: gaps (NaN) where a length has no committed migration."""
    return [r.get(key, math.nan) for r in rows]


def report_table(report: dict) -> str:
    header = ["tokens", "inter-token ms (no migration)", "downtime ms (client)", "downtime ms (server)",
              "of which last copy ms", "longest pause before the switch ms", "migration ms", "stages", "blocks",
              "recomputed tokens", "recompute ms", "token-identical", "committed"]
    rows = [[k, *(cell(r.get(key)) for key in ("inter_token_ms", "client_downtime_ms", "server_downtime_ms",
                                                "final_copy_ms", "stage_stall_ms", "migration_total_ms")),
             cell(r.get("stages"), ".0f"), cell(r.get("blocks"), ".0f"), str(r.get("recomputed_tokens", "-")),
             cell(r["recompute_ms"]), r.get("token_identical", "-"), r["committed"]]
            for k, r in report["results"].items()]
    comparison = "; ".join(f"{k}: {cell(v, '.3f')}" for k, v in report["comparison"].items())
    table = f"{markdown_table(header, rows)}\n\n{comparison}"
    titles = {"network": "Network transport (two Ray nodes, Ray's object store)",
              "one_node": "Both instances on one Ray node (the local path, every call through Ray)"}
    for key, title in titles.items():
        if key not in report:
            continue
        header = ["tokens", "downtime ms (client)", "downtime ms (server)", "of which last copy ms", "migration ms",
                  "stages", "blocks", "recomputed tokens", "token-identical", "committed", "downtime / local",
                  "migration / local"]
        rows = [[k, *(cell(r.get(key)) for key in ("client_downtime_ms", "server_downtime_ms", "final_copy_ms",
                                                    "migration_total_ms")),
                 cell(r.get("stages"), ".0f"), cell(r.get("blocks"), ".0f"), str(r.get("recomputed_tokens", "-")),
                 r.get("token_identical", "-"), r["committed"],
                 cell(over["downtime_over_local"], ".2f", "x"), cell(over["total_over_local"], ".2f", "x")]
                for (k, r), over in zip(report[key]["results"].items(), report[key]["over_local"].values())]
        table += f"\n\n{title}, over the local path above:\n\n{markdown_table(header, rows)}"
    if "network" in report:
        table += "\n\nNetwork downtime over one Ray node's: " + "; ".join(
            f"{k}: {cell(v, '.2f', 'x')}" for k, v in report["network"]["downtime_over_one_node"].items())
    return table


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def device_count() -> int:
    import torch

    return torch.cuda.device_count()


def write_docs(report: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(f"# Live migration downtime\n\nCommand: `{report['command']}`\n\n"
                                      f"{report_table(report)}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(k) for k in report["results"]]
    rows = list(report["results"].values())
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(lengths, series(rows, "client_downtime_ms"), "o-", label="migration downtime (client)")
    ax.plot(lengths, series(rows, "migration_total_ms"), "s--", label="migration, first copy to switch")
    ax.plot(lengths, [r["recompute_ms"] for r in rows], "^-", label="recompute on destination")
    if "network" in report:
        network = list(report["network"]["results"].values())
        ax.plot(lengths, series(network, "client_downtime_ms"), "o:", label="downtime, network transport")
        ax.plot(lengths, series(network, "migration_total_ms"), "s:", label="migration, network transport")
        one_node = list(report["one_node"]["results"].values())
        ax.plot(lengths, series(one_node, "client_downtime_ms"), "x-.", label="downtime, one Ray node")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("ms")
    settings = report["settings"]
    ax.set_title(f"Live migration vs recomputation\n{settings['model']}, {settings['device']}, "
                 f"{settings['transport']} transport", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


if __name__ == "__main__":
    run_benchmark(main)
