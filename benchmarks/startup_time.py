"""How long a model of several instances takes to serve: engines started one at a time against
engines started together, on the same host in the same run.

One llumnix-serve per mode, each with one model of N instances:

- `profiled` (the baseline): every instance gets a memory share (`gpu_memory_utilization`) and
  vLLM sizes its KV cache by profiling, so engines on one GPU start one at a time;
- `sized`: every instance is given its KV cache's size (`resources.gpu_kv_cache_gib`, the same
  blocks), so vLLM skips profiling and the engines start together.

On a CPU host (the tiny model) the KV cache is always sized; `profiled` there starts the
engines one at a time (`--max-parallel-starts 1`) to show what the parallel start is worth.

Reported per mode: seconds from starting the server until the model serves, the server's own
figure (`llumnix:model_load_duration_seconds`, first engine start to the model ready), and
each instance's ready time from the start-up lines, with their spread; then the ratio of
`sized` over `profiled`. Prints JSON and a table; writes docs/benchmarks/NAME.{json,md}.

    python benchmarks/startup_time.py [--shape tiny|llama-2-7b] [--instances 4] [--blocks 512]
        [--gpu-memory-utilization 0.2] [--name startup_time]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from llumnix_backend.tiny_models import LLAMA_2_7B_BLOCK_BYTES, TinyLlamaRecipe, ensure_model, write_llama_2_7b_shape
from llumnix_server.launcher import llumnix_server, wait_for_repository

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, publish, run_benchmark  # noqa: E402

MODEL = "bench"
READY_LINE = re.compile(rf"\[llumnix\] {MODEL}/(\d+): ready in ([0-9.]+) s")


def model_config(work: Path, args, mode: str) -> dict:
    if args.shape == "tiny":
        engine = {"model": str(ensure_model(work / "model", TinyLlamaRecipe(seed=0))), "enforce_eager": True}
        resources: dict = {"cpu_kv_cache_gib": 0.125, "cpu_threads": 1}
    else:
        engine = {"model": str(write_llama_2_7b_shape(work / "model")), "load_format": "dummy",
                  "num_gpu_blocks_override": args.blocks, "max_model_len": 4096}
        resources = {"gpu_memory_utilization": args.gpu_memory_utilization}
        if mode == "sized":  # the same blocks, and the null block vLLM keeps
            resources["gpu_kv_cache_gib"] = (args.blocks + 1) * LLAMA_2_7B_BLOCK_BYTES / 2**30
    return {"instances": args.instances, "engine": engine, "resources": resources,
            "scheduler": {"migration": {"rescheduling": False}}}


def start_once(args, mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="startup-time-") as tmp:
        work = Path(tmp)
        folder = work / "repository" / MODEL
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(model_config(work, args, mode)))
        extra = ("--max-parallel-starts", "1") if args.shape == "tiny" and mode == "profiled" else ()
        server = llumnix_server(work / "repository", work / "server.log", extra_args=extra)
        began = time.monotonic()
        server.start()
        try:
            index = wait_for_repository(server, args.timeout)
            serving_after = time.monotonic() - began
            (entry,) = [m for m in index if m["name"] == MODEL]
            listing = httpx.get(f"{server.url}/v2/llumnix/models/{MODEL}/instances", timeout=30).json()
            metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        finally:
            server.stop()
        log = (work / "server.log").read_text(errors="replace")
    ready = sorted(float(s) for _, s in READY_LINE.findall(log))
    load = re.search(rf'^llumnix:model_load_duration_seconds_sum\{{model_name="{MODEL}"\}} (\S+)$', metrics, re.M)
    return {
        "mode": mode,
        "state": entry["state"],
        "serving_after_s": round(serving_after, 1),
        "model_load_s": round(float(load.group(1)), 1) if load else None,
        "instance_ready_s": ready,
        "ready_spread_s": round(ready[-1] - ready[0], 1) if ready else None,
        "instances": [{"id": i["id"], "state": i["state"], "gpus": i["gpus"],
                       "blocks": (i["snapshot"] or {}).get("total_blocks")} for i in listing["instances"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "llama-2-7b"), default="tiny")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=512, help="KV blocks per instance (7B shape)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=560, help="seconds a mode may take to serve")
    parser.add_argument("--modes", default="profiled,sized")
    parser.add_argument("--name", default="startup_time")
    args = parser.parse_args()
    runs = []
    for mode in args.modes.split(","):
        runs.append(start_once(args, mode))
        print(f"  {mode}: serving after {runs[-1]['serving_after_s']} s", file=sys.stderr, flush=True)
    by_mode = {r["mode"]: r for r in runs}
    ratio = None
    if {"profiled", "sized"} <= set(by_mode):
        ratio = round(by_mode["sized"]["serving_after_s"] / by_mode["profiled"]["serving_after_s"], 2)
    result = {"benchmark": "startup_time", "command": command_line(),
              "settings": {k: v for k, v in vars(args).items() if k != "name"},
              "runs": runs, "sized_over_profiled": ratio}
    rows = [[r["mode"], r["state"], f"{r['serving_after_s']}", f"{r['model_load_s']}",
             " ".join(f"{s:.1f}" for s in r["instance_ready_s"]), f"{r['ready_spread_s']}",
             " ".join(",".join(map(str, i["gpus"])) or "-" for i in r["instances"]),
             " ".join(str(i["blocks"]) for i in r["instances"])] for r in runs]
    text = markdown_table(["mode", "state", "serving after s", "model load s", "instances ready at s",
                           "spread s", "GPUs", "KV blocks"], rows)
    text += f"\n\nsized / profiled (serving after): {ratio}\n"
    publish(args.name, result, f"Start-up time: {args.instances} instances of {args.shape}", text)


if __name__ == "__main__":
    run_benchmark(main)
