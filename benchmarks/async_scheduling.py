"""What vLLM's async scheduling is worth, and what Llumnix's engine hooks cost.

Engines of the same model with the same memory, started one after another in this process
and driven through vLLM's own `AsyncLLM` by the same loads:

- `vllm`: what `vllm serve` runs: vLLM's scheduler, FCFS, async scheduling wherever the
  platform has it (GPU; the CPU build turns it off), vLLM's choice of model runner (0.26 on
  GPU picks its V2 runner for dense models);
- `vllm-v1`: the same on vLLM's V1 model runner, the one migration reads block tables from;
- `vllm-sync`: V1 runner, async scheduling off (`--no-async-scheduling`);
- `vllm-sync-priority`, `vllm-sync-connector`: `vllm-sync` plus one of what Llumnix adds
  (priority scheduling; the migration connector), to tell their costs apart;
- `llumnix`: the engine arguments this project's backend gives every instance
  (`LlumnixScheduler`, the migration connector, priority scheduling; async scheduling where
  vLLM turns it on, with `LlumnixAsyncScheduler`);
- `llumnix-sync`: the same with async scheduling off, as the backend ran before its hooks
  worked under async scheduling;
- `llumnix-deferred-frees`: `llumnix` with vLLM's own rule for freeing blocks under async
  scheduling with a loading KV connector (deferred until the step in flight lands), which
  Llumnix's scheduler turns off (see `LlumnixScheduler.__init__`), as it ran before that.

All keep Llumnix's worker extension, which only adds methods (on the CPU it sizes the
thread pool, so that the engines compare on equal threads).

Loads, after a warm-up request: one stream, `--streams` concurrent streams (mean time per
output token, TPOT), and a burst of `--burst` requests at once (output tokens per second, and
the preemptions vLLM counted during it). Prompts are random token ids, outputs forced to their
length (`ignore_eos`).

    python benchmarks/async_scheduling.py [--shape tiny|llama-2-7b] [--variants vllm,vllm-sync,llumnix]
        [--prompt 512] [--output 256] [--streams 16] [--burst 128] [--name async_scheduling]

Prints JSON and a table with each variant's figures over the first variant's, and writes
docs/benchmarks/NAME.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, SamplingParams

from llumnix_backend.repository import load_model_source
from llumnix_backend.tiny_models import TinyLlamaRecipe, ensure_model, write_llama_2_7b_shape
from llumnix_vllm.backend import VllmBackend
from llumnix_vllm.engine_scheduler import LlumnixAsyncScheduler, LlumnixScheduler
from llumnix_vllm.instance import build_engine
from llumnix_vllm.snapshot_channel import new_instance_token

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, publish  # noqa: E402

VARIANTS = ("vllm", "vllm-v1", "vllm-sync", "vllm-sync-priority", "vllm-sync-connector", "llumnix", "llumnix-sync",
            "llumnix-deferred-frees")
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"  # read by each engine process as it starts
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AsyncEngineArgs)}
# What the backend adds for Llumnix, beyond its worker extension.
LLUMNIX_ONLY = ("scheduler_cls", "kv_transfer_config", "scheduling_policy")


def backend_engine_args(work: Path, args) -> tuple[AsyncEngineArgs, int | None]:
    """The engine arguments (and CPU threads) the backend derives from a model folder."""
    folder = work / "model-repository" / "bench"
    folder.mkdir(parents=True)
    if args.shape == "tiny":
        engine = {"model": str(ensure_model(work / "model", TinyLlamaRecipe(seed=0))), "enforce_eager": True}
        resources = {"cpu_kv_cache_gib": args.cpu_kv_cache_gib, "cpu_threads": 1}
    else:
        engine = {"model": str(write_llama_2_7b_shape(work / "model")), "load_format": "dummy"}
        resources = {"gpu_memory_utilization": args.gpu_memory_utilization}
    engine["max_model_len"] = args.prompt + args.output + 16
    (folder / "config.yaml").write_text(yaml.safe_dump({"engine": engine, "resources": resources}))
    source = load_model_source(folder)
    return VllmBackend().engine_args(source), source.config.resources.cpu_threads


class LlumnixDeferringFrees(LlumnixAsyncScheduler):
    """The `llumnix-deferred-frees` engine's scheduler (its process imports it from here)."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        # vLLM's rule, as in its Scheduler.__init__.
        self.defer_block_free = (vllm_config.max_concurrent_batches > 1
                                 and vllm_config.kv_transfer_config.is_kv_consumer)


def variant_engine_args(llumnix: AsyncEngineArgs, variant: str) -> AsyncEngineArgs:
    if variant == "llumnix":
        return llumnix
    if variant == "llumnix-sync":
        return dataclasses.replace(llumnix, async_scheduling=False)
    if variant == "llumnix-deferred-frees":
        return dataclasses.replace(llumnix, scheduler_cls=f"{Path(__file__).stem}.{LlumnixDeferringFrees.__name__}")
    plain = dataclasses.replace(llumnix, **{k: FIELD_DEFAULTS[k] for k in LLUMNIX_ONLY})
    if variant in ("vllm", "vllm-v1"):
        return plain
    sync = dataclasses.replace(plain, async_scheduling=False)
    if variant == "vllm-sync-priority":
        return dataclasses.replace(sync, scheduling_policy=llumnix.scheduling_policy)
    if variant == "vllm-sync-connector":
        return dataclasses.replace(sync, kv_transfer_config=llumnix.kv_transfer_config)
    return sync


async def one_stream(engine, prompt: list[int], max_tokens: int,
                     request_id: str) -> tuple[float, float, int, int | None]:
    """(seconds to the first token, seconds from the first token to the last, tokens, times the
    engine preempted it: vLLM's per-request stats, which the backend's stat logger keeps on;
    None where vLLM's stats do not count them, as 0.26's do not)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                            output_kind=RequestOutputKind.DELTA)
    sent = time.perf_counter()
    first = last = sent
    tokens, preemptions = 0, None
    async for output in engine.generate({"prompt_token_ids": prompt}, params, request_id):
        n = sum(len(c.token_ids) for c in output.outputs)
        if n and tokens == 0:
            first = time.perf_counter()
        tokens += n
        last = time.perf_counter()
        preemptions = getattr(output.metrics, "num_preemptions", preemptions)
    return first - sent, last - first, tokens, preemptions


async def load(engine, rng: random.Random, vocab: int, count: int, args, label: str) -> dict:
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt)] for _ in range(count)]
    began = time.perf_counter()
    results = await asyncio.gather(*(one_stream(engine, p, args.output, f"{label}-{i}")
                                     for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - began
    tokens = sum(r[2] for r in results)
    if tokens != count * args.output:
        raise RuntimeError(f"{label}: {tokens} of {count * args.output} tokens came back")
    counted = [r[3] for r in results]
    return {"requests": count, "preemptions": None if None in counted else sum(counted), "elapsed_s": elapsed,
            "output_tokens_per_s": tokens / elapsed,
            "mean_ttft_ms": 1000 * statistics.fmean(r[0] for r in results),
            "mean_tpot_ms": 1000 * statistics.fmean(r[1] / (r[2] - 1) for r in results)}


async def measure(variant: str, engine_args: AsyncEngineArgs, cpu_threads: int | None, args) -> dict:
    if variant == "vllm":
        os.environ.pop(RUNNER_ENV, None)
    else:
        os.environ[RUNNER_ENV] = "0"  # as the backend sets it
    began = time.perf_counter()
    engine = await asyncio.to_thread(build_engine, engine_args, new_instance_token())
    try:
        started_s = time.perf_counter() - began
        if cpu_threads is not None:
            await engine.collective_rpc("llumnix_prepare_cpu_worker", args=(cpu_threads,))
        vllm_config = engine.vllm_config
        vocab = vllm_config.model_config.get_vocab_size()
        rng = random.Random(0)  # the same prompts for every variant
        await load(engine, rng, vocab, 1, args, "warmup")
        figures = {"single": await load(engine, rng, vocab, 1, args, "single"),
                   "streams": await load(engine, rng, vocab, args.streams, args, "streams"),
                   "burst": await load(engine, rng, vocab, args.burst, args, "burst")}
        return {"variant": variant, "engine_start_s": started_s,
                "async_scheduling": bool(vllm_config.scheduler_config.async_scheduling),
                "scheduler": scheduler_name(vllm_config.scheduler_config),
                "model_runner": "vLLM's choice" if variant == "vllm" else "V1",
                "policy": vllm_config.scheduler_config.policy, **figures}
    finally:
        engine.shutdown()


def scheduler_name(scheduler_config) -> str:
    """The class the engine runs: Llumnix's scheduler picks its async variant as vLLM creates it."""
    cls = scheduler_config.get_scheduler_cls()
    if cls is LlumnixScheduler and scheduler_config.async_scheduling:
        cls = LlumnixAsyncScheduler
    return cls.__name__


def ratios(results: list[dict]) -> dict[str, dict[str, float]]:
    """Each variant over the first one measured: throughput and TPOT per load."""
    base = results[0]
    return {r["variant"]: {f"{load}_{key}": r[load][key] / base[load][key]
                           for load in ("single", "streams", "burst")
                           for key in ("output_tokens_per_s", "mean_tpot_ms")}
            for r in results[1:]}


def table(results: list[dict], over: dict[str, dict[str, float]]) -> str:
    base = results[0]["variant"]
    rows = []
    for r in results:
        ratio = over.get(r["variant"], {})
        rows.append([r["variant"], r["scheduler"], r["model_runner"], "on" if r["async_scheduling"] else "off",
                     r["policy"],
                     f"{r['single']['mean_tpot_ms']:.2f}", f"{r['streams']['mean_tpot_ms']:.2f}",
                     f"{r['burst']['output_tokens_per_s']:.0f}",
                     "-" if r["burst"].get("preemptions") is None else f"{r['burst']['preemptions']:.0f}",
                     f"{ratio['burst_output_tokens_per_s']:.3f}" if ratio else "1",
                     f"{ratio['single_mean_tpot_ms']:.3f}" if ratio else "1"])
    return markdown_table(["variant", "scheduler", "model runner", "async", "policy", "TPOT ms (1 stream)",
                           "TPOT ms (streams)", "burst output tok/s", "burst preemptions", f"burst tok/s over {base}",
                           f"1-stream TPOT over {base}"], rows)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, [r["single"]["mean_tpot_ms"] for r in results], label="1 stream")
    axes[0].bar(names, [r["streams"]["mean_tpot_ms"] for r in results], alpha=0.5, label="streams")
    axes[0].set_ylabel("mean TPOT (ms)")
    axes[0].legend()
    axes[1].bar(names, [r["burst"]["output_tokens_per_s"] for r in results])
    axes[1].set_ylabel("burst output tokens/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "llama-2-7b"), default="tiny")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--burst", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--cpu-kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--name", default="async_scheduling")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="async-scheduling-") as tmp:
        llumnix_args, cpu_threads = backend_engine_args(Path(tmp), args)
        for variant in variants:
            results.append(asyncio.run(measure(variant, variant_engine_args(llumnix_args, variant),
                                               cpu_threads, args)))
            print(f"  {variant}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    over = ratios(results)
    device = "cpu" if current_platform.is_cpu() else current_platform.get_device_name()
    result = {"benchmark": "async_scheduling", "command": command_line(), "device": device,
              "settings": {k: v for k, v in vars(args).items() if k != "name"}, "results": results,
              f"over_{results[0]['variant']}": over}
    png = publish(args.name, result, f"Async scheduling: {args.shape} on {device}", table(results, over))
    plot(results, png, f"{args.shape} on {device}: prompt {args.prompt}, output {args.output}")


if __name__ == "__main__":
    main()
