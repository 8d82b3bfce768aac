"""Prometheus metrics for every model and instance, in a registry owned by the server.

Request metrics are observed as requests finish. Instance gauges (running and waiting
requests, KV usage, freeness, state) are read from the latest snapshots when Prometheus
scrapes, so they are never stale and cost nothing between scrapes. Names follow vLLM's where
the meaning is the same (`vllm:time_to_first_token_seconds`, ...), with vLLM's labels: `engine`
(the instance's id) and `model_name`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from llumnix_backend.snapshot import KV_RESIDENCY_BOUNDS, STEP_TOKEN_BOUNDS, InstanceSnapshot, Tally

if TYPE_CHECKING:
    from llumnix_backend.migration import MigrationReport

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
# vLLM's buckets (vllm/v1/metrics/buckets.py in 0.32), which the vllm: metrics keep.
VLLM_TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                                    10.0, 20.0, 40.0, 80.0)
VLLM_REQUEST_NUM_PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
VLLM_REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                                240.0, 480.0, 960.0, 1920.0, 7680.0)


def _le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(str(float(bound)) for bound in bounds), "+Inf")


# The `le` labels of the histograms whose counts a snapshot carries (`Tally`).
_STEP_TOKEN_LE = _le_labels(STEP_TOKEN_BOUNDS)
_KV_RESIDENCY_LE = _le_labels(KV_RESIDENCY_BOUNDS)


def _add_tally(family: HistogramMetricFamily, labels: list[str], tally: Tally, le: tuple[str, ...]) -> None:
    if tally.counts:
        family.add_metric(labels, list(zip(le, itertools.accumulate(tally.counts))), tally.total)


def one_two_five(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value`: vLLM's token-count buckets (`build_1_2_5_buckets`)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


# vLLM ends its series at the model's max_model_len; this registry serves every model, so it
# runs on to 10M tokens (the buckets past a model's length just hold all of its requests).
REQUEST_TOKEN_BUCKETS = one_two_five(10_000_000)
# vLLM's labels; an `instance` label would clash with the one Prometheus gives each scrape target
# (it renames ours to `exported_instance`).
MODEL_INSTANCE = ("model_name", "engine")


@dataclass(frozen=True)
class InstanceReport:
    """One instance as the metrics see it at scrape time."""

    model: str
    instance_id: str
    state: str
    snapshot: InstanceSnapshot | None
    freeness: float | None
    gpus: tuple[int, ...] = ()  # the GPUs it runs on (none on a CPU host)
    node: str | None = None  # the Ray node it runs on (None on a single host)


InstanceStates = tuple[str, ...]


class ServerMetrics:
    def __init__(self, instance_reports: Callable[[], Iterable[InstanceReport]], states: InstanceStates,
                 model_states: Callable[[], Iterable[tuple[str, str]]] = tuple, model_state_names: tuple[str, ...] = ()
                 ) -> None:
        """`model_states()`: (model, state) pairs at scrape time, the state one of `model_state_names`."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llumnix:requests", "Requests by outcome (success, aborted, error, timeout, rejected, overloaded).",
            (*MODEL_INSTANCE, "outcome"), registry=r,
        )
        self.request_success = Counter(
            "vllm:request_success", "Requests that finished, by why (stop, length, abort), as vLLM counts them.",
            (*MODEL_INSTANCE, "finished_reason"), registry=r,
        )

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, MODEL_INSTANCE, registry=r)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, documentation, MODEL_INSTANCE, buckets=buckets, registry=r)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        # vLLM's split of them: local_compute + local_cache_hit + external_kv_transfer = the total.
        # (A request counts under its first instance, which never loads KV over a connector.)
        self.prompt_tokens_by_source = Counter("vllm:prompt_tokens_by_source", "Prompt tokens by source.",
                                               (*MODEL_INSTANCE, "source"), registry=r)
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Prompt tokens the prefix cache held (local + external).")
        self.prompt_tokens_cached_by_source = Counter(
            "vllm:prompt_tokens_cached_by_source", "Prefix-cache hit tokens by the cache tier that supplied them "
            "(device: the engine's own KV cache).", (*MODEL_INSTANCE, "source"), registry=r)
        # vLLM's, for the model's queue bound (`admission.max_waiting_requests`: its max_num_queued_reqs).
        self.admission_rejections = Counter("vllm:admission_rejections",
                                            "Admission attempts rejected by a queue limit, by reason.",
                                            ("model_name", "reason"), registry=r)
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               REQUEST_TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens", "Tokens generated per request.",
                                                   REQUEST_TOKEN_BUCKETS)
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "The max_tokens each request was given (the rest of the context if "
            "none).", REQUEST_TOKEN_BUCKETS)
        # vLLM's, once per prompt of an API call (its "parent request" of `n` choices):
        self.request_params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                          VLLM_REQUEST_PARAMS_N_BUCKETS)
        self.request_max_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens", "The most tokens any of a prompt's n choices generated.",
            REQUEST_TOKEN_BUCKETS)
        self.prefill_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens", "Prompt tokens whose KV a request's first prefill computed "
            "(not found in the prefix cache).", REQUEST_TOKEN_BUCKETS)
        self.request_preemptions = histogram(
            "vllm:request_num_preemptions", "Times a request was preempted, on every instance it ran on.",
            VLLM_REQUEST_NUM_PREEMPTIONS_BUCKETS)
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the engines' prefix caches (once per request).")
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Of those, the tokens the prefix cache held (not computed).")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first output token.",
                              VLLM_TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Time between a request's consecutive outputs as the server streams them "
                             "(one per output, however many tokens it carries, as vLLM counts).",
                             VLLM_INTER_TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              VLLM_INTER_TOKEN_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Time from a request's first output token to its last.",
                                     VLLM_REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Time from a request's first scheduling to its first output token.",
                                      VLLM_REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Time from a request's first scheduling to its last output token "
                                        "(prefill and decode).", VLLM_REQUEST_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last output token.",
                             VLLM_REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Time a request waited in its engine's queue.",
                                    VLLM_REQUEST_LATENCY_BUCKETS)
        self.dispatch = Counter(
            "llumnix:dispatch_decisions", "Requests dispatched to an instance, by policy.",
            (*MODEL_INSTANCE, "policy"), registry=r,
        )
        pair = ("model_name", "source", "destination")
        self.migrations_started = Counter(
            "llumnix:migrations_started", "Live migrations started, per instance pair.", pair, registry=r,
        )
        self.migrations_committed = Counter(
            "llumnix:migrations_committed", "Live migrations whose destination took the request over.", pair, registry=r,
        )
        self.migrations_aborted = Counter(
            "llumnix:migrations_aborted", "Live migrations abandoned before the switch, by reason.",
            (*pair, "reason"), registry=r,
        )
        self.migration_downtime = Histogram(
            "llumnix:migration_downtime_seconds", "Pause of the request's stream at the switch.",
            pair, buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.migration_duration = Histogram(
            "llumnix:migration_duration_seconds", "Whole migration, first copy to switch.",
            pair, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.replays = Counter(
            "llumnix:replays", "Requests continued on another instance after theirs was lost, per instance pair.",
            pair, registry=r,
        )
        self.instance_failures = counter("llumnix:instance_failures", "Instances found dead or hung while serving.")
        self.instance_restarts = counter("llumnix:instance_restarts", "Restarts of lost instances.")
        self.migration_blocks = Counter("llumnix:migration_blocks", "KV blocks copied by migrations.", pair, registry=r)
        self.migration_bytes = Counter("llumnix:migration_bytes", "KV bytes copied by migrations.", pair, registry=r)
        r.register(_InstanceCollector(instance_reports, states))
        r.register(_ModelStateCollector(model_states, model_state_names))
        self.model_operations = Counter(
            "llumnix:model_operations", "Model loads, reloads and unloads, by outcome (success, failure).",
            ("model_name", "operation", "outcome"), registry=r,
        )
        self.model_load_duration = Histogram(
            "llumnix:model_load_duration_seconds", "Time from starting a model version's engines until it serves.",
            ("model_name",), buckets=(1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600), registry=r,
        )

    def record_migration(self, model: str, report: MigrationReport) -> None:
        pair = (model, report.source, report.destination)
        self.migration_duration.labels(*pair).observe(report.duration_s)
        self.migration_blocks.labels(*pair).inc(report.blocks)
        self.migration_bytes.labels(*pair).inc(report.bytes)
        if report.committed:
            self.migrations_committed.labels(*pair).inc()
            if report.downtime_s is not None:
                self.migration_downtime.labels(*pair).observe(report.downtime_s)
        else:
            self.migrations_aborted.labels(*pair, _reason_label(report.reason)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _reason_label(reason: str) -> str:
    """A bounded label for an abort reason: its words before any detail."""
    return reason.split(":", 1)[0][:60] or "unknown"


class _ModelStateCollector:
    def __init__(self, model_states: Callable[[], Iterable[tuple[str, str]]], names: tuple[str, ...]) -> None:
        self._model_states = model_states
        self._names = names

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("llumnix:model_state", "1 for the state each model is in.",
                                  labels=["model_name", "state"])
        for model, current in self._model_states():
            for name in self._names:
                gauge.add_metric([model, name], 1.0 if current == name else 0.0)
        yield gauge


class _InstanceCollector:
    def __init__(self, reports: Callable[[], Iterable[InstanceReport]], states: InstanceStates) -> None:
        self._reports = reports
        self._states = states

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = list(MODEL_INSTANCE)
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the engine's running batch.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests queued in the engine.", labels=labels)
        # As vLLM splits it: "capacity" and "deferred" add up to vllm:num_requests_waiting.
        waiting_by_reason = GaugeMetricFamily("vllm:num_requests_waiting_by_reason",
                                              "Requests queued in the engine, by why they wait.",
                                              labels=[*labels, "reason"])
        kv_usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", labels=labels)
        kv_total = GaugeMetricFamily("llumnix:kv_blocks_total", "KV blocks of the instance.", labels=labels)
        freeness = GaugeMetricFamily("llumnix:instance_freeness", "Llumnix freeness (free virtual KV room in tokens per request: decode steps left).", labels=labels)
        # A counter, as in vLLM; it starts again from 0 when an instance restarts.
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Preemptions since the instance started.",
                                          labels=labels)
        state = GaugeMetricFamily("llumnix:instance_state", "1 for the state the instance is in.", labels=[*labels, "state"])
        gpus = GaugeMetricFamily("llumnix:instance_gpus", "GPUs an instance runs on (label gpus: their indices).",
                                 labels=[*labels, "gpus"])
        node = GaugeMetricFamily("llumnix:instance_node", "1 for the Ray node an instance runs on (label node: its id).",
                                 labels=[*labels, "node"])
        # vLLM's info gauge (1, the settings in labels), with the settings the snapshots tell.
        cache_info = GaugeMetricFamily("vllm:cache_config_info", "The engine's KV cache: block size and blocks.",
                                       labels=[*labels, "block_size", "num_gpu_blocks"])
        step_tokens = HistogramMetricFamily("vllm:iteration_tokens_total", "Tokens scheduled per engine step.",
                                            labels=labels)
        # Only where the engine speculates (as in vLLM).
        drafts, draft_tokens, accepted = (CounterMetricFamily(name, text, labels=labels) for name, text in (
            ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts."),
            ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens."),
            ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.")))
        accepted_per_position = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                                    "Accepted tokens per draft position.", labels=[*labels, "position"])
        # Sampled, and only where the engine runs with `kv_cache_metrics` (as in vLLM).
        residency = [HistogramMetricFamily(name, text, labels=labels) for name, text in (
            ("vllm:kv_block_lifetime_seconds", "KV cache block lifetime from allocation to eviction (sampled)."),
            ("vllm:kv_block_idle_before_evict_seconds", "KV cache block idle time before eviction (sampled)."),
            ("vllm:kv_block_reuse_gap_seconds", "Time between consecutive uses of a KV cache block (sampled)."))]
        count: dict[str, int] = {}
        for report in self._reports():
            key = [report.model, report.instance_id]
            count[report.model] = count.get(report.model, 0) + (report.state == "ready")
            for name in self._states:
                state.add_metric([*key, name], 1.0 if report.state == name else 0.0)
            if report.gpus:
                gpus.add_metric([*key, ",".join(map(str, report.gpus))], len(report.gpus))
            if report.node:
                node.add_metric([*key, report.node], 1.0)
            snap = report.snapshot
            if snap is None:
                continue
            running.add_metric(key, len(snap.running))
            waiting.add_metric(key, len(snap.waiting))
            waiting_by_reason.add_metric([*key, "capacity"], len(snap.waiting) - snap.num_deferred)
            waiting_by_reason.add_metric([*key, "deferred"], snap.num_deferred)
            kv_usage.add_metric(key, snap.used_blocks / max(1, snap.total_blocks))
            kv_total.add_metric(key, snap.total_blocks)
            cache_info.add_metric([*key, str(snap.block_size), str(snap.total_blocks)], 1.0)
            preemptions.add_metric(key, snap.num_preemptions)
            _add_tally(step_tokens, key, snap.step_tokens, _STEP_TOKEN_LE)
            if (spec := snap.spec_decode) is not None:
                for family, total in ((drafts, spec.drafts), (draft_tokens, spec.draft_tokens),
                                      (accepted, spec.accepted_tokens)):
                    family.add_metric(key, total)
                for position, total in enumerate(spec.accepted_per_position):
                    accepted_per_position.add_metric([*key, str(position)], total)
            if snap.kv_residency is not None:
                tallies = (snap.kv_residency.lifetime, snap.kv_residency.idle_before_evict, snap.kv_residency.reuse_gap)
                for family, tally in zip(residency, tallies):
                    _add_tally(family, key, tally, _KV_RESIDENCY_LE)
            if report.freeness is not None:
                freeness.add_metric(key, report.freeness)
        ready = GaugeMetricFamily("llumnix:ready_instances", "Instances serving each model.", labels=["model_name"])
        for model, n in sorted(count.items()):
            ready.add_metric([model], n)
        yield from (running, waiting, waiting_by_reason, kv_usage, kv_total, cache_info, freeness, preemptions,
                    step_tokens, *residency, drafts, draft_tokens, accepted, accepted_per_position, state, gpus,
                    node, ready)
