"""The Grafana dashboard (`docs/grafana/llumnix-dashboard.json`) queries only metrics the server
exports, under the names Prometheus gives their series, and shows what an operator watches."""

from __future__ import annotations

import json
import re
from pathlib import Path

from llumnix_backend.metrics import ServerMetrics

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana" / "llumnix-dashboard.json"
METRIC_NAME = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*")  # ours all have a prefix: vllm:, llumnix:
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Every series name the server's /metrics can carry (families render even before samples)."""
    metrics = ServerMetrics(lambda: [], ("ready",), lambda: [], ("READY",))
    series = set()
    for line in metrics.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            series.update(base + suffix for suffix in SERIES_SUFFIXES[kind])
    return series


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_query_names_an_exported_metric() -> None:
    exported = exported_series()
    for expr in queries():
        names = METRIC_NAME.findall(expr)
        assert names, f"no metric in {expr!r}"
        unknown = set(names) - exported
        assert not unknown, f"{expr!r} queries {sorted(unknown)}, which the server does not export"


def test_the_dashboard_shows_what_the_issue_lists() -> None:
    used = {name for expr in queries() for name in METRIC_NAME.findall(expr)}
    for needed in ("vllm:time_to_first_token_seconds_bucket", "vllm:request_time_per_output_token_seconds_bucket",
                   "vllm:generation_tokens_total", "vllm:kv_cache_usage_perc", "llumnix:instance_freeness",
                   "vllm:num_requests_waiting", "llumnix:migrations_committed_total",
                   "llumnix:migration_downtime_seconds_bucket", "llumnix:replays_total", "llumnix:model_state",
                   "vllm:inter_token_latency_seconds_bucket", "vllm:prefix_cache_hits_total",
                   "vllm:prefix_cache_queries_total"):
        assert needed in used, needed
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and all(p["targets"] for p in panels)
