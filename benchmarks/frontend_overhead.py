"""Front-end overhead: llumnix-serve (one instance) against vLLM's own OpenAI server.

Both serve the same locally generated model with the same engine settings; the same streaming
workloads go to each, alternating (A B, then B A, ...) so drift on a noisy machine hits both.
Two workloads:

- throughput: many concurrent streams; output tokens per second of wall time;
- latency: one request at a time, short outputs; time to first token (TTFT).

    python benchmarks/frontend_overhead.py [--rounds 3] [--requests 96] [--concurrency 24]

Prints JSON and a table; writes docs/benchmarks/frontend_overhead.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml

from llumnix_backend.tiny_models import TinyLlamaRecipe, ensure_model
from llumnix_server.launcher import ServerProcess, free_port, llumnix_server, wait_for_repository

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import WorkloadResult, command_line, markdown_table, percentile, run_benchmark, run_workload  # noqa: E402

MODEL_NAME = "bench"
ENGINE = {"max_model_len": 2048, "enforce_eager": True}
KV_CACHE_GIB = 0.5
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
# Both servers run their engines with the same environment, so only the front ends differ:
# no thread binding (vLLM's default, auto, pins every engine to the same cores) and one compute
# thread per engine (llumnix-serve's default on this 2-core host is cores - 1 = 1; vLLM
# otherwise takes every core and starves its own front end, see docs/performance.md).
ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def vllm_server(model_dir: Path, log: Path) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(ENGINE["max_model_len"]), "--enforce-eager",
        "--kv-cache-memory-bytes", str(int(KV_CACHE_GIB * (1 << 30))),
        # The same scheduling policy llumnix-serve runs its engines with.
        "--scheduling-policy", "priority", "--disable-uvicorn-access-log",
    ]
    return ServerProcess(command, port, log, env=ENGINE_ENV)


def llumnix(model_dir: Path, work: Path) -> ServerProcess:
    repository = work / "repository"
    (repository / MODEL_NAME).mkdir(parents=True, exist_ok=True)
    config = {
        "instances": 1,
        "engine": {"model": str(model_dir), **ENGINE},
        "resources": {"cpu_kv_cache_gib": KV_CACHE_GIB},
        "scheduler": {"dispatch_policy": "llumnix"},
    }
    (repository / MODEL_NAME / "config.yaml").write_text(yaml.safe_dump(config))
    server = llumnix_server(repository, work / "llumnix.log", extra_args=("--log-level", "warning"))
    server.env = ENGINE_ENV
    return server


def summarize(runs: list[WorkloadResult]) -> dict[str, float]:
    ttfts = [r.ttft * 1000 for run in runs for r in run.ok]
    tpots = [(r.latency - r.ttft) * 1000 / (r.output_tokens - 1) for run in runs for r in run.ok if r.output_tokens > 1]
    tokens = sum(run.output_tokens for run in runs)
    wall = sum(run.wall_time for run in runs)
    errors = sum(len(run.requests) - len(run.ok) for run in runs)
    return {
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "tpot_p50_ms": percentile(tpots, 50),
        "requests": sum(len(run.requests) for run in runs),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="requests per throughput round")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--latency-requests", type=int, default=40, help="sequential requests per latency round")
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args()

    rng = random.Random(0)
    # Token-id prompts (bytes of the generated tokenizer): no tokenisation differences.
    prompts = [[rng.randrange(3, 259) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    latency_prompts = [[rng.randrange(3, 259) for _ in range(args.prompt_tokens)] for _ in range(args.latency_requests)]

    with tempfile.TemporaryDirectory(prefix="llumnix-bench-") as tmp:
        work = Path(tmp)
        model_dir = ensure_model(work / "model", TinyLlamaRecipe(seed=0))
        launchers = {"vllm": lambda: vllm_server(model_dir, work / "vllm.log"),
                     "llumnix": lambda: llumnix(model_dir, work)}
        results = measure(launchers, prompts, latency_prompts, args)

    report = build_report(results, args)
    print(json.dumps(report, indent=2))
    print(report_table(report))
    write_docs(report, args.out)


def start(name: str, launch: Callable[[], ServerProcess]) -> ServerProcess:
    server = launch().start()
    try:
        if name == "vllm":
            server.wait_until("/health", lambda r: r.status_code == 200, 300)
        else:
            wait_for_repository(server, 300)
    except BaseException:
        server.stop()
        raise
    return server


def cpu_seconds(server: ServerProcess) -> tuple[float, float]:
    """CPU time used so far by the server's own process (the HTTP front end, which hosts
    AsyncLLM's input and output processing in both servers) and by its engine processes."""
    front = psutil.Process(server.process.pid)
    engine = 0.0
    for child in front.children(recursive=True):
        try:
            times = child.cpu_times()
            engine += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    times = front.cpu_times()
    return times.user + times.system, engine


def measure(launchers: dict[str, Callable[[], ServerProcess]], prompts, latency_prompts, args) -> dict:
    """Each round starts each server afresh and measures it alone: on two cores, an idle engine
    beside the one measured (vLLM's idle workers poll) would tilt the comparison."""
    results: dict[str, dict[str, list]] = {
        n: {"throughput": [], "latency": [], "cpu_ms_per_1k_tokens": []} for n in launchers
    }
    for round_index in range(args.rounds):
        order = list(launchers) if round_index % 2 == 0 else list(reversed(launchers))
        for name in order:
            server = start(name, launchers[name])
            try:
                # Warm up: first requests pay one-off costs (allocations, caches).
                asyncio.run(run_workload(server.url, MODEL_NAME, prompts[:8], 16, 8))
                cpu_before = cpu_seconds(server)
                run = asyncio.run(run_workload(server.url, MODEL_NAME, prompts, args.output_tokens, args.concurrency))
                results[name]["throughput"].append(run)
                front, engine = (after - before for after, before in zip(cpu_seconds(server), cpu_before))
                per_1k = 1000 / max(1, run.output_tokens)
                results[name]["cpu_ms_per_1k_tokens"].append((front * 1000 * per_1k, engine * 1000 * per_1k))
                results[name]["latency"].append(
                    asyncio.run(run_workload(server.url, MODEL_NAME, latency_prompts, 16, 1)))
            finally:
                server.stop()
            print(f"round {round_index + 1}/{args.rounds}: {name} done", file=sys.stderr)
    return results


def paired_ratios(results, phase: str, metric) -> list[float]:
    """Per round, llumnix's figure over vLLM's: the two ran back to back, so slow drift of a
    noisy machine cancels out within a pair."""
    return [metric(l) / metric(v) for l, v in zip(results["llumnix"][phase], results["vllm"][phase])]


def build_report(results, args) -> dict:
    summary = {
        name: {phase: summarize(phases[phase]) for phase in ("throughput", "latency")}
        | {"cpu_ms_per_1k_tokens": {
            "front_end": statistics.median(f for f, _ in phases["cpu_ms_per_1k_tokens"]),
            "engine": statistics.median(e for _, e in phases["cpu_ms_per_1k_tokens"]),
        }}
        for name, phases in results.items()
    }
    per_round = {
        name: [round(run.output_tokens / run.wall_time, 1) for run in phases["throughput"]]
        for name, phases in results.items()
    }
    ratios = paired_ratios(results, "throughput", lambda run: run.output_tokens / run.wall_time)
    v, llx = summary["vllm"], summary["llumnix"]
    comparison = {
        "throughput_ratio_median": statistics.median(ratios),
        "throughput_ratio_per_round": [round(r, 3) for r in ratios],
        "throughput_ratio_pooled": llx["throughput"]["output_tokens_per_s"] / v["throughput"]["output_tokens_per_s"],
        "ttft_p50_delta_ms": llx["latency"]["ttft_p50_ms"] - v["latency"]["ttft_p50_ms"],
        "ttft_p99_delta_ms": llx["latency"]["ttft_p99_ms"] - v["latency"]["ttft_p99_ms"],
        "loaded_ttft_p50_delta_ms": llx["throughput"]["ttft_p50_ms"] - v["throughput"]["ttft_p50_ms"],
        "front_end_cpu_ratio": llx["cpu_ms_per_1k_tokens"]["front_end"] / v["cpu_ms_per_1k_tokens"]["front_end"],
        "engine_cpu_ratio": llx["cpu_ms_per_1k_tokens"]["engine"] / v["cpu_ms_per_1k_tokens"]["engine"],
    }
    return {
        "benchmark": "frontend_overhead",
        "command": command_line(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"engine": ENGINE, "kv_cache_gib": KV_CACHE_GIB, "env": ENGINE_ENV},
        "results": summary,
        "throughput_per_round": per_round,
        "comparison": comparison,
        "targets": {
            "throughput_ratio_at_least": 0.9,
            "ttft_p50_delta_ms_at_most": 5.0,
            "met": comparison["throughput_ratio_median"] >= 0.9 and comparison["ttft_p50_delta_ms"] <= 5.0,
        },
    }


def report_table(report: dict) -> str:
    rows = []
    for phase in ("throughput", "latency"):
        for name in ("vllm", "llumnix"):
            r = report["results"][name][phase]
            rows.append([phase, name, f"{r['output_tokens_per_s']:.0f}", f"{r['ttft_p50_ms']:.1f}",
                         f"{r['ttft_p99_ms']:.1f}", f"{r['tpot_p50_ms']:.2f}", str(r["requests"]), str(r["errors"])])
    header = ["workload", "server", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "requests", "errors"]
    table = markdown_table(header, rows)
    cpu_rows = [[name, f"{report['results'][name]['cpu_ms_per_1k_tokens']['front_end']:.0f}",
                 f"{report['results'][name]['cpu_ms_per_1k_tokens']['engine']:.0f}"] for name in ("vllm", "llumnix")]
    table += "\n\nCPU time per 1,000 output tokens (throughput workload, median of rounds):\n\n"
    table += markdown_table(["server", "front-end process ms", "engine processes ms"], cpu_rows)
    c = report["comparison"]
    return (f"{table}\n\nthroughput llumnix/vllm: median of paired rounds {c['throughput_ratio_median']:.3f} "
            f"(rounds: {', '.join(f'{r:.3f}' for r in c['throughput_ratio_per_round'])}); "
            f"TTFT p50 delta (sequential): {c['ttft_p50_delta_ms']:+.1f} ms, p99 delta: {c['ttft_p99_delta_ms']:+.1f} ms; "
            f"TTFT p50 delta under load: {c['loaded_ttft_p50_delta_ms']:+.1f} ms; "
            f"CPU per token llumnix/vllm: front end {c['front_end_cpu_ratio']:.2f}, engine {c['engine_cpu_ratio']:.2f}")


def write_docs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontend_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "frontend_overhead.md").write_text(
        f"# Front-end overhead\n\nCommand: `{report['command']}`\n\n{report_table(report)}\n"
    )
    plot(report, out / "frontend_overhead.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["vllm", "llumnix"]
    results = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    axes[0].bar(names, [results[n]["throughput"]["output_tokens_per_s"] for n in names], color=["grey", "tab:blue"])
    axes[0].set_title("output tokens/s (concurrent)")
    for ax, (phase, title) in zip(axes[1:], [("throughput", "TTFT under load (ms)"), ("latency", "TTFT sequential (ms)")]):
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [results[n][phase]["ttft_p50_ms"] for n in names], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [results[n][phase]["ttft_p99_ms"] for n in names], 0.4, label="p99")
        ax.set_xticks(list(x), names)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("llumnix-serve (1 instance) vs vLLM's OpenAI server, same model and engine settings")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    run_benchmark(main)
