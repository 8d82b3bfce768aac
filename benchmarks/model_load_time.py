"""Time from a model folder appearing in a watched repository to the model's first response.

One llumnix-serve in poll mode (the default) per setting of `--repository-quiet-s`. For each
repeat a complete model folder (the generated 2-layer Llama, one instance) is moved into the
repository in one rename, and a client asks the model for 4 tokens every 10 ms until one
answer succeeds. The time is split into:

- engine start: the server's own figure (`llumnix:model_load_duration_seconds`, from
  starting the model's engines until one serves), the baseline;
- everything else: the rest, i.e. noticing the folder and waiting for it to settle (the quiet
  period), reading the config, loading the tokenizer and vLLM's config, dispatching the first
  request and computing its 4 tokens.

The folder is then removed and the model unloaded before the next repeat (a new name each
time). Target: everything else under 1 s. Prints JSON and a table; writes
docs/benchmarks/model_load_time.{json,md,png}.

    python benchmarks/model_load_time.py [--repeats 3] [--quiet 0.5,0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from llumnix_backend.tiny_models import TinyLlamaRecipe, ensure_model
from llumnix_server.launcher import ServerProcess, llumnix_server, wait_for_repository

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, run_benchmark  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
POLL_S = 0.01
TARGET_OTHER_S = 1.0


def load_seconds_sum(server: ServerProcess, model: str) -> float:
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf'^llumnix:model_load_duration_seconds_sum{{model_name="{model}"}} (\S+)$', metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def first_response_after(server: ServerProcess, model: str, timeout_s: float) -> float:
    """Seconds until `model` answers a 4-token request successfully."""
    began = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while time.monotonic() - began < timeout_s:
            response = client.post(f"/v2/models/{model}/generate",
                                   json={"text_input": "Hello", "parameters": {"max_tokens": 4}})
            if response.status_code == 200:
                return time.monotonic() - began
            time.sleep(POLL_S)
    raise TimeoutError(f"{model} did not answer within {timeout_s} s")


def wait_gone(server: ServerProcess, model: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = {m["name"] for m in httpx.post(server.url + "/v2/repository/index", timeout=10).json()}
        if model not in listed:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{model} was not unloaded")


def measure(work: Path, weights: Path, quiet_s: float, repeats: int, log: Path) -> list[dict]:
    repository = work / f"repository-{quiet_s}"
    repository.mkdir()
    server = llumnix_server(repository, log, extra_args=("--repository-quiet-s", str(quiet_s), "--log-level", "warning"))
    server.start()
    runs = []
    try:
        wait_for_repository(server, 120)
        for repeat in range(repeats):
            name = f"dropped-{repeat}"
            staging = work / "staging" / name
            staging.mkdir(parents=True)
            config = {"instances": 1, "engine": {"model": str(weights), "max_model_len": 1024, "enforce_eager": True},
                      "resources": {"cpu_kv_cache_gib": 0.25}}
            (staging / "config.yaml").write_text(yaml.safe_dump(config))
            engine_before = load_seconds_sum(server, name)
            os.rename(staging, repository / name)  # the folder appears whole, as `mv` makes it
            total = first_response_after(server, name, 300)
            engine = load_seconds_sum(server, name) - engine_before
            runs.append({"total_s": total, "engine_start_s": engine, "other_s": total - engine})
            print(f"quiet {quiet_s} s, repeat {repeat + 1}: {runs[-1]}", file=sys.stderr)
            shutil.rmtree(repository / name)
            wait_gone(server, name)
    finally:
        server.stop()
    return runs


def summarize(runs: list[dict]) -> dict:
    return {key.removesuffix("_s") + "_ms": statistics.median(r[key] for r in runs) * 1000
            for key in ("total_s", "engine_start_s", "other_s")} | {"worst_other_ms": max(r["other_s"] for r in runs) * 1000}


def report_table(report: dict) -> str:
    header = ["quiet period s", "folder to first response ms", "engine start ms", "everything else ms",
              "everything else, worst ms", "of which quiet period ms"]
    rows = [[quiet, f"{r['total_ms']:.0f}", f"{r['engine_start_ms']:.0f}", f"{r['other_ms']:.0f}",
             f"{r['worst_other_ms']:.0f}", f"{float(quiet) * 1000:.0f}"] for quiet, r in report["results"].items()]
    return markdown_table(header, rows)


def write_docs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_load_time.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "model_load_time.md").write_text(f"# Model load time\n\nCommand: `{report['command']}`\n\n"
                                            f"{report_table(report)}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quiets = list(report["results"])
    rows = list(report["results"].values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(quiets, [r["engine_start_ms"] for r in rows], label="engine start")
    ax.bar(quiets, [r["other_ms"] for r in rows], bottom=[r["engine_start_ms"] for r in rows],
           label="everything else")
    ax.set_xlabel("--repository-quiet-s")
    ax.set_ylabel("ms, folder appears to first response")
    ax.set_title("Dropping a model folder into a watched repository (CPU, tiny Llama)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "model_load_time.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet", default="0.5,0.1", help="--repository-quiet-s settings to measure")
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="llumnix-load-time-") as tmp:
        work = Path(tmp)
        weights = ensure_model(work / "weights", TinyLlamaRecipe(seed=0))
        for quiet in args.quiet.split(","):
            results[quiet] = summarize(measure(work, weights, float(quiet), args.repeats, work / f"server-{quiet}.log"))
    worst_other_s = max(r["worst_other_ms"] for r in results.values()) / 1000
    report = {
        "benchmark": "model_load_time",
        "command": command_line(),
        "settings": {"repeats": args.repeats, "model": "tiny llama (2 layers, hidden 256), 1 instance, CPU"},
        "results": results,
        "comparison": {f"everything_else_over_total_quiet_{q}": r["other_ms"] / r["total_ms"] for q, r in results.items()},
        "targets": {"everything_else_under_s": TARGET_OTHER_S, "met": worst_other_s < TARGET_OTHER_S},
    }
    print(json.dumps(report, indent=2))
    print(report_table(report))
    write_docs(report, args.out)


if __name__ == "__main__":
    run_benchmark(main)
