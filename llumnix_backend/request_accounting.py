"""What a model counts of the requests it serves: the Prometheus figures of each request (as
vLLM's server defines them) and the totals of Triton's statistics extension, recorded as the
outputs arrive and once when the request ends, whatever instances it ran on."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from llumnix_backend.metrics import ServerMetrics
from llumnix_backend.requests import GenerationDelta, GenerationRequest

# One line per request as it ends (`llumnix-serve --no-request-log` turns it off).
request_log = logging.getLogger("llumnix.requests")


@dataclass
class ModelStats:
    """Counts of the requests a model served, as Triton's statistics extension reports them."""

    success: int = 0
    success_ns: int = 0  # arrival to the end, summed
    fail: int = 0
    fail_ns: int = 0
    queue: int = 0
    queue_ns: int = 0  # in the engines' queues, summed
    last_inference_ms: int = 0  # wall-clock milliseconds since the epoch

    def record(self, succeeded: bool, duration_s: float, queue_time_s: float | None) -> None:
        if succeeded:
            self.success, self.success_ns = self.success + 1, self.success_ns + int(duration_s * 1e9)
        else:
            self.fail, self.fail_ns = self.fail + 1, self.fail_ns + int(duration_s * 1e9)
        if queue_time_s is not None:
            self.queue, self.queue_ns = self.queue + 1, self.queue_ns + int(queue_time_s * 1e9)
        self.last_inference_ms = int(time.time() * 1000)


class ChoiceGroup:
    """The `n` choices an API call asks for of one prompt (vLLM's parent request): vLLM counts
    `n`, and the most tokens any of them generated, once, as the last of them ends."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._left, self._most = n, 0

    def finished(self, n_generated: int) -> int | None:
        """One choice ended having generated `n_generated`; the group's most once all have."""
        self._left -= 1
        self._most = max(self._most, n_generated)
        return self._most if self._left == 0 else None


class RequestTracker:
    """Per-request latency and token accounting: inter-token latencies as the outputs come, the
    rest once when the request ends."""

    def __init__(self, metrics: ServerMetrics, stats: ModelStats, model: str, instance_id: str,
                 request: GenerationRequest, n_prompt: int, reads_prefix_cache: bool, max_tokens: int,
                 group: ChoiceGroup | None = None) -> None:
        """`reads_prefix_cache`: the engine looks the prompt up in its prefix cache; `max_tokens`:
        the most it may generate; `group`: the choices of its prompt it is one of (none: alone)."""
        self._metrics = metrics
        self._stats = stats
        self._labels = (model, instance_id)
        self._itl = metrics.itl.labels(*self._labels)
        self._request_id = request.request_id
        self._arrival = request.arrival_time or time.monotonic()
        self._n_prompt = n_prompt
        self._reads_prefix_cache = reads_prefix_cache
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._cached_tokens: int | None = None  # of the prompt, as the first prefill found them
        self._n_generated = 0
        self._queue_time: float | None = None
        self._prefill_time: float | None = None
        self._max_tokens = max_tokens
        self._group = group or ChoiceGroup(1)
        # Preemptions: on the instances the request left, and on the one running it (its count).
        self._preemptions_before = self._preemptions_here = 0
        self._finish_reason: str | None = None
        self.outcome: str | None = None

    def observe(self, delta: GenerationDelta) -> None:
        if delta.token_ids:
            self._tokens_arrived(delta)
        self._n_generated += len(delta.token_ids)
        if self._queue_time is None:  # the first instance's: an instance taking over queues it again
            self._queue_time, self._prefill_time = delta.queue_time, delta.prefill_time
        if delta.num_preemptions is not None:
            self._preemptions_here = delta.num_preemptions
        if delta.finished:
            self._finish_reason = delta.finish_reason
            self.outcome = "aborted" if delta.finish_reason == "abort" else "success"

    def moved(self) -> None:
        """The request went on to another instance (migrated or replayed): its count starts over."""
        self._preemptions_before += self._preemptions_here
        self._preemptions_here = 0

    def _tokens_arrived(self, delta: GenerationDelta) -> None:
        now = time.monotonic()
        if self._first_token_at is None:
            self._first_token_at = now
            # The first prefill's: an instance taking over after a switch counts the KV it was handed.
            self._cached_tokens = delta.num_cached_tokens
        else:
            self._itl.observe(now - self._last_token_at)  # one per output, however many tokens, as vLLM counts
        self._last_token_at = now

    def finish(self, last_instance: str) -> None:
        """Record the request's figures; `last_instance`: where it ended (after any switch)."""
        m, labels = self._metrics, self._labels
        now = time.monotonic()
        outcome = self.outcome or "aborted"
        if request_log.isEnabledFor(logging.INFO):
            ttft = "-" if self._first_token_at is None else f"{1e3 * (self._first_token_at - self._arrival):.0f}"
            request_log.info("model=%s instance=%s request=%s prompt_tokens=%d output_tokens=%d ttft_ms=%s "
                             "e2e_ms=%.0f outcome=%s", labels[0], last_instance, self._request_id, self._n_prompt,
                             self._n_generated, ttft, 1e3 * (now - self._arrival), outcome)
        m.requests.labels(*labels, outcome).inc()
        if self._finish_reason is not None:
            m.request_success.labels(*labels, self._finish_reason).inc()
        self._stats.record(self.outcome == "success", now - self._arrival, self._queue_time)
        m.prompt_tokens.labels(*labels).inc(self._n_prompt)
        cached = max(0, self._cached_tokens or 0)  # (unknown without a first output: none)
        for source, tokens in (("local_compute", self._n_prompt - cached), ("local_cache_hit", cached),
                               ("external_kv_transfer", 0)):
            m.prompt_tokens_by_source.labels(*labels, source).inc(tokens)
        m.prompt_tokens_cached.labels(*labels).inc(cached)
        m.prompt_tokens_cached_by_source.labels(*labels, "device").inc(cached)
        m.generation_tokens.labels(*labels).inc(self._n_generated)
        m.request_prompt_tokens.labels(*labels).observe(self._n_prompt)
        m.request_generation_tokens.labels(*labels).observe(self._n_generated)
        m.request_params_max_tokens.labels(*labels).observe(self._max_tokens)
        if (most := self._group.finished(self._n_generated)) is not None:
            m.request_params_n.labels(*labels).observe(self._group.n)
            m.request_max_generation_tokens.labels(*labels).observe(most)
        m.request_preemptions.labels(*labels).observe(self._preemptions_before + self._preemptions_here)
        if self._cached_tokens is not None:
            m.prefill_kv_computed.labels(*labels).observe(self._n_prompt - max(0, self._cached_tokens))
        if self._reads_prefix_cache and self._cached_tokens is not None:
            m.prefix_cache_queries.labels(*labels).inc(self._n_prompt)
            m.prefix_cache_hits.labels(*labels).inc(self._cached_tokens)
        if self._queue_time is not None:
            m.queue_time.labels(*labels).observe(self._queue_time)
        if self._first_token_at is None:
            return
        m.ttft.labels(*labels).observe(self._first_token_at - self._arrival)
        if self.outcome == "success":
            m.e2e.labels(*labels).observe(now - self._arrival)
            decode_time = self._last_token_at - self._first_token_at
            m.decode_time.labels(*labels).observe(decode_time)
            if self._prefill_time is not None:
                m.prefill_time.labels(*labels).observe(self._prefill_time)
                m.inference_time.labels(*labels).observe(self._prefill_time + decode_time)
            if self._n_generated > 1:
                m.tpot.labels(*labels).observe(decode_time / (self._n_generated - 1))
