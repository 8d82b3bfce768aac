"""Per-request metrics as a request's outputs arrive: vLLM's names, counted as vLLM counts them."""

from __future__ import annotations

from llumnix_backend.metrics import REQUEST_TOKEN_BUCKETS, InstanceReport, ServerMetrics, one_two_five
from llumnix_backend.request_accounting import ChoiceGroup, ModelStats, RequestTracker
from llumnix_backend.requests import GenerationDelta, GenerationRequest
from llumnix_backend.snapshot import (
    KV_RESIDENCY_BOUNDS,
    STEP_TOKEN_BOUNDS,
    BucketCounter,
    InstanceSnapshot,
    KvResidency,
    RequestLoad,
    SpecDecodeTally,
)

LABELS = {"model_name": "m", "engine": "0"}
N_PROMPT = 40


def test_one_two_five_is_vllms_token_series() -> None:
    assert one_two_five(100) == (1, 2, 5, 10, 20, 50, 100)
    assert one_two_five(4096)[-3:] == (500, 1000, 2000)  # vLLM's for max_model_len 4096
    assert REQUEST_TOKEN_BUCKETS[-1] == 10_000_000


def test_prompt_logprobs_skip_the_prefix_cache() -> None:
    assert GenerationRequest("r", (1, 2)).reads_prefix_cache
    assert not GenerationRequest("r", (1, 2), sampling={"prompt_logprobs": 0}).reads_prefix_cache


def track(deltas: list[GenerationDelta], reads_prefix_cache: bool = True) -> ServerMetrics:
    metrics = ServerMetrics(lambda: [], ("ready",))
    tracker = RequestTracker(metrics, ModelStats(), "m", "0", GenerationRequest("r", tuple(range(N_PROMPT))),
                              N_PROMPT, reads_prefix_cache, max_tokens=100)
    for delta in deltas:
        tracker.observe(delta)
    tracker.finish("1")
    return metrics


def value(metrics: ServerMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, LABELS)


# A request that switches instances after its fourth token: the instance taking over reports
# the KV it was handed as cached. One output carries three tokens, as a speculative step would.
SWITCHED = [
    GenerationDelta((), "", num_cached_tokens=16),  # a prefill chunk
    GenerationDelta((7,), "a", num_cached_tokens=16),
    GenerationDelta((7, 8, 9), "bcd", num_cached_tokens=16),
    GenerationDelta((5,), "e", num_cached_tokens=N_PROMPT + 3),
    GenerationDelta((6,), "f", finish_reason="length", num_cached_tokens=N_PROMPT + 3),
]


def test_inter_token_latency_is_one_per_output_after_the_first() -> None:
    metrics = track(SWITCHED)
    assert value(metrics, "vllm:inter_token_latency_seconds_count") == 3
    assert value(metrics, "vllm:request_decode_time_seconds_count") == 1
    # Consecutive gaps add up to the first token's distance from the last.
    assert abs(value(metrics, "vllm:inter_token_latency_seconds_sum")
               - value(metrics, "vllm:request_decode_time_seconds_sum")) < 1e-9


def test_token_histograms_and_prefix_cache_count_the_request_once() -> None:
    metrics = track(SWITCHED)
    assert value(metrics, "vllm:request_prompt_tokens_sum") == N_PROMPT
    assert value(metrics, "vllm:request_generation_tokens_sum") == 6
    assert value(metrics, "vllm:request_generation_tokens_count") == 1
    assert value(metrics, "vllm:prefix_cache_queries_total") == N_PROMPT
    assert value(metrics, "vllm:prefix_cache_hits_total") == 16  # the first prefill's, not the migrated KV
    by_source = {source: metrics.registry.get_sample_value("vllm:prompt_tokens_by_source_total",
                                                           {**LABELS, "source": source})
                 for source in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    assert by_source == {"local_compute": N_PROMPT - 16, "local_cache_hit": 16, "external_kv_transfer": 0}
    assert sum(by_source.values()) == value(metrics, "vllm:prompt_tokens_total")  # vLLM's invariant
    assert value(metrics, "vllm:prompt_tokens_cached_total") == 16
    assert metrics.registry.get_sample_value("vllm:prompt_tokens_cached_by_source_total",
                                             {**LABELS, "source": "device"}) == 16


def test_no_prefix_cache_figures_without_a_lookup_or_a_prefill() -> None:
    assert value(track(SWITCHED, reads_prefix_cache=False), "vllm:prefix_cache_queries_total") is None
    aborted_in_the_queue = track([GenerationDelta((), "", finish_reason="abort", num_cached_tokens=0)])
    assert value(aborted_in_the_queue, "vllm:prefix_cache_queries_total") is None
    assert value(aborted_in_the_queue, "vllm:inter_token_latency_seconds_count") == 0


def test_queue_and_prefill_times_are_the_first_instances_and_buckets_are_vllms() -> None:
    switched = [GenerationDelta((7,), "a", queue_time=0.25, prefill_time=0.5), GenerationDelta((8,), "b"),
                # the instance taking over queued the migrated request too: not the request's wait
                GenerationDelta((5,), "c", queue_time=0.01, prefill_time=0.02, finish_reason="length")]
    metrics = track(switched)
    assert value(metrics, "vllm:request_queue_time_seconds_sum") == 0.25
    assert value(metrics, "vllm:request_queue_time_seconds_count") == 1
    assert value(metrics, "vllm:request_prefill_time_seconds_sum") == 0.5
    # inference = prefill + decode, as vLLM's (first scheduling to last token)
    assert abs(value(metrics, "vllm:request_inference_time_seconds_sum") - 0.5
               - value(metrics, "vllm:request_decode_time_seconds_sum")) < 1e-9
    ttft_bounds = [s.labels["le"] for f in metrics.registry.collect() if f.name == "vllm:time_to_first_token_seconds"
                   for s in f.samples if s.name.endswith("_bucket") and s.labels["engine"] == "0"]
    assert ttft_bounds[:2] == ["0.001", "0.005"] and ttft_bounds[-2:] == ["2560.0", "+Inf"]  # vLLM 0.32's


def test_preemptions_add_up_over_the_instances_a_request_ran_on() -> None:
    metrics = ServerMetrics(lambda: [], ("ready",))
    tracker = RequestTracker(metrics, ModelStats(), "m", "0", GenerationRequest("r", tuple(range(N_PROMPT))),
                              N_PROMPT, True, max_tokens=100)
    for delta in (GenerationDelta((7,), "a", num_preemptions=1, num_cached_tokens=16),
                  GenerationDelta((8,), "b", num_preemptions=2)):
        tracker.observe(delta)
    tracker.moved()  # the instance taking over counts from 0
    tracker.observe(GenerationDelta((9,), "c", finish_reason="length", num_preemptions=1))
    tracker.finish("1")
    assert value(metrics, "vllm:request_num_preemptions_sum") == 3
    assert value(metrics, "vllm:request_params_max_tokens_sum") == 100
    assert value(metrics, "vllm:request_prefill_kv_computed_tokens_sum") == N_PROMPT - 16


def test_a_prompts_n_choices_are_counted_once_as_vllm_counts_a_parent_request() -> None:
    metrics = ServerMetrics(lambda: [], ("ready",))
    group = ChoiceGroup(3)
    for generated in (4, 9, 2):
        tracker = RequestTracker(metrics, ModelStats(), "m", "0", GenerationRequest("r", (1, 2)), 2, True,
                                 max_tokens=10, group=group)
        assert value(metrics, "vllm:request_params_n_count") in (None, 0.0)  # not before the last choice ends
        tracker.observe(GenerationDelta(tuple(range(generated)), "x" * generated, finish_reason="length"))
        tracker.finish("0")
    assert value(metrics, "vllm:request_params_n_count") == 1 and value(metrics, "vllm:request_params_n_sum") == 3
    assert value(metrics, "vllm:request_max_num_generation_tokens_sum") == 9
    # A request alone is a group of one.
    single = track([GenerationDelta((5, 6), "ab", finish_reason="length")])
    assert value(single, "vllm:request_params_n_sum") == 1
    assert value(single, "vllm:request_max_num_generation_tokens_sum") == 2


def test_waiting_requests_by_reason_add_up_to_the_waiting_gauge_as_in_vllm() -> None:
    waiting = tuple(RequestLoad(f"w{i}", 0, 10, 0, 1) for i in range(3))
    snapshot = InstanceSnapshot(10, 0, 16, waiting=waiting, num_deferred=1)
    report = InstanceReport(model="m", instance_id="0", state="ready", snapshot=snapshot, freeness=None)
    metrics = ServerMetrics(lambda: [report], ("ready",))
    by_reason = "vllm:num_requests_waiting_by_reason"
    assert metrics.registry.get_sample_value(by_reason, {**LABELS, "reason": "capacity"}) == 2
    assert metrics.registry.get_sample_value(by_reason, {**LABELS, "reason": "deferred"}) == 1
    assert value(metrics, "vllm:num_requests_waiting") == 3


def test_engine_steps_by_tokens_are_vllms_iteration_tokens_histogram() -> None:
    # Three steps of 1 token, one of 100 (bucket 128), one of 20,000 (past the last bound).
    steps = BucketCounter(STEP_TOKEN_BOUNDS)
    for scheduled in (1, 1, 1, 100, 20_000):
        steps.observe(scheduled)
    snapshot = InstanceSnapshot(10, 0, 16, step_tokens=steps.tally())
    report = InstanceReport(model="m", instance_id="0", state="ready", snapshot=snapshot, freeness=None)
    metrics = ServerMetrics(lambda: [report], ("ready",))
    bucket = "vllm:iteration_tokens_total_bucket"
    assert metrics.registry.get_sample_value(bucket, {**LABELS, "le": "1.0"}) == 3
    assert metrics.registry.get_sample_value(bucket, {**LABELS, "le": "64.0"}) == 3
    assert metrics.registry.get_sample_value(bucket, {**LABELS, "le": "128.0"}) == 4
    assert metrics.registry.get_sample_value(bucket, {**LABELS, "le": "+Inf"}) == 5
    assert value(metrics, "vllm:iteration_tokens_total_sum") == 20_103
    assert value(metrics, "vllm:iteration_tokens_total_count") == 5


def test_sampled_kv_block_residency_is_vllms_three_histograms_where_the_engine_samples_it() -> None:
    lifetime, idle, reuse_gap = (BucketCounter(KV_RESIDENCY_BOUNDS) for _ in range(3))
    for seconds in (0.0005, 3.0, 4000.0):  # the first bucket, the 5 s one, past the last bound
        lifetime.observe(seconds)
    idle.observe(0.5)
    sampled = KvResidency(lifetime.tally(), idle.tally(), reuse_gap.tally())
    reports = [InstanceReport(model="m", instance_id=i, state="ready", freeness=None,
                              snapshot=InstanceSnapshot(10, 0, 16, kv_residency=residency))
               for i, residency in (("0", sampled), ("1", None))]
    metrics = ServerMetrics(lambda: reports, ("ready",))
    bucket = "vllm:kv_block_lifetime_seconds_bucket"
    assert metrics.registry.get_sample_value(bucket, {**LABELS, "le": "0.001"}) == 1
    assert metrics.registry.get_sample_value(bucket, {**LABELS, "le": "5.0"}) == 2
    assert metrics.registry.get_sample_value(bucket, {**LABELS, "le": "+Inf"}) == 3
    assert value(metrics, "vllm:kv_block_lifetime_seconds_sum") == 4003.0005
    assert value(metrics, "vllm:kv_block_idle_before_evict_seconds_count") == 1
    assert value(metrics, "vllm:kv_block_reuse_gap_seconds_count") == 0
    # An instance that does not sample shows no residency, as vLLM registers none.
    unsampled = {"engine": "1", "model_name": "m"}
    assert metrics.registry.get_sample_value("vllm:kv_block_lifetime_seconds_count", unsampled) is None


def test_speculative_decoding_is_vllms_counters_where_the_engine_speculates() -> None:
    tally = SpecDecodeTally(accepted_per_position=(0, 0, 0)).plus(2, 6, 3, [2, 1, 0]).plus(1, 3, 3, [1, 1, 1])
    assert tally == SpecDecodeTally(3, 9, 6, (3, 2, 1))
    reports = [InstanceReport(model="m", instance_id=i, state="ready", freeness=None,
                              snapshot=InstanceSnapshot(10, 0, 16, spec_decode=spec))
               for i, spec in (("0", tally), ("1", None))]
    metrics = ServerMetrics(lambda: reports, ("ready",))
    assert value(metrics, "vllm:spec_decode_num_drafts_total") == 3
    assert value(metrics, "vllm:spec_decode_num_draft_tokens_total") == 9
    assert value(metrics, "vllm:spec_decode_num_accepted_tokens_total") == 6
    per_position = [metrics.registry.get_sample_value("vllm:spec_decode_num_accepted_tokens_per_pos_total",
                                                      {**LABELS, "position": str(p)}) for p in range(3)]
    assert per_position == [3, 2, 1]
    # An instance that does not speculate shows none, as vLLM registers none.
    unsampled = {"engine": "1", "model_name": "m"}
    assert metrics.registry.get_sample_value("vllm:spec_decode_num_drafts_total", unsampled) is None
