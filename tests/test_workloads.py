"""The benchmarks' workloads: seeded, at the rate asked, and the same requests with priorities on
or off (what `policy_eval.py` and `simulate.py` both replay)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from workloads import LENGTHS, TRACES, WorkloadSpec, generate  # noqa: E402

TRACES_THERE = (TRACES / "AzureLLMInferenceTrace_conv.csv").exists()


def arrivals_for(lengths: str) -> list[str]:
    return ["poisson", "gamma-cv4"] + (["trace"] if lengths.startswith("azure") else [])


@pytest.mark.parametrize("lengths", LENGTHS)
def test_every_workload_is_seeded_bounded_and_at_its_rate(lengths: str) -> None:
    if lengths.startswith("azure") and not TRACES_THERE:
        pytest.skip(f"no traces in {TRACES}")
    for arrivals in arrivals_for(lengths):
        spec = WorkloadSpec(lengths, arrivals, rate=4.0, num_requests=400, max_len=2048, seed=3)
        requests = generate(spec)
        assert requests == generate(spec)  # the same spec, the same requests
        assert requests != generate(WorkloadSpec(lengths, arrivals, 4.0, 400, max_len=2048, seed=4))
        assert len(requests) == 400
        assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in requests)
        assert all(r.prompt_tokens + r.output_tokens <= 2048 for r in requests)
        assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
        rate = (len(requests) - 1) / requests[-1].arrival_s
        assert 3.0 < rate < 5.4, (arrivals, rate)


def test_gamma_arrivals_are_as_bursty_as_asked() -> None:
    for cv in (2, 8):
        requests = generate(WorkloadSpec("sharegpt", f"gamma-cv{cv}", rate=1.0, num_requests=4000, seed=1))
        gaps = [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]
        assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.3)


@pytest.mark.skipif(not TRACES_THERE, reason="no Azure traces beside the project")
def test_trace_lengths_are_the_traces() -> None:
    requests = generate(WorkloadSpec("azure-conv", "trace", rate=5.5, num_requests=19_366, max_len=100_000))
    # The whole conversation trace: prompt median 1,020, output median 129 (shared/traces/README.md),
    # inter-arrival CV 1.09.
    assert statistics.median(r.prompt_tokens for r in requests) == 1020
    assert statistics.median(r.output_tokens for r in requests) == 129
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.09, abs=0.05)


def test_priorities_off_keeps_the_same_requests() -> None:
    on = generate(WorkloadSpec("sharegpt", "poisson", 2.0, 500, high_share=0.1, seed=2))
    off = generate(WorkloadSpec("sharegpt", "poisson", 2.0, 500, high_share=0.1, priorities=False, seed=2))
    assert 25 < sum(r.high for r in on) < 80
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens, r.high) for r in on] == [
        (r.arrival_s, r.prompt_tokens, r.output_tokens, r.high) for r in off]
    assert {r.priority for r in on if r.high} == {-1} and {r.priority for r in off} == {0}
