"""The figures a policy run is judged by, the same for real runs and simulated ones.

A run is a list of per-request outcomes (anything with `arrival_s`-relative `ttft_s`,
`e2e_s`, `token_gaps`, `output_tokens`, `high`, `error`), plus counters from the server or the
simulator (preemptions, migrations) and the wall time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from loadgen import markdown_table, percentile


@dataclass(frozen=True)
class Outcome:
    ttft_s: float
    e2e_s: float
    output_tokens: int
    token_gaps: tuple[float, ...] = ()
    high: bool = False
    error: str | None = None


@dataclass
class RunSummary:
    policy: str
    workload: str
    rate: float
    seed: int
    completed: int
    failed: int
    preemptions: int
    migrations: int
    duration_s: float
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> figure -> value

    def row(self, klass: str = "all") -> dict:
        return {"policy": self.policy, "workload": self.workload, "rate": self.rate, "seed": self.seed,
                "class": klass, "completed": self.completed, "failed": self.failed,
                "preemptions": self.preemptions, "migrations": self.migrations, **self.figures.get(klass, {})}


def _figures(outcomes: list[Outcome], duration_s: float) -> dict[str, float]:
    ok = [o for o in outcomes if o.error is None]
    if not ok:
        return {}
    ttft = [o.ttft_s for o in ok]
    gaps = [g for o in ok for g in o.token_gaps]
    return {
        "mean_ttft_s": statistics.fmean(ttft),
        "p50_ttft_s": percentile(ttft, 50),
        "p99_ttft_s": percentile(ttft, 99),
        "p99_tbt_s": percentile(gaps, 99) if gaps else 0.0,
        "mean_e2e_s": statistics.fmean(o.e2e_s for o in ok),
        "p99_e2e_s": percentile([o.e2e_s for o in ok], 99),
        "throughput_tok_s": sum(o.output_tokens for o in ok) / max(duration_s, 1e-9),
    }


def summarize(policy: str, workload: str, rate: float, seed: int, outcomes: list[Outcome], preemptions: int,
              migrations: int, duration_s: float) -> RunSummary:
    summary = RunSummary(policy, workload, rate, seed, sum(o.error is None for o in outcomes),
                         sum(o.error is not None for o in outcomes), preemptions, migrations, duration_s)
    summary.figures["all"] = _figures(outcomes, duration_s)
    if any(o.high for o in outcomes):
        summary.figures["high"] = _figures([o for o in outcomes if o.high], duration_s)
        summary.figures["normal"] = _figures([o for o in outcomes if not o.high], duration_s)
    return summary


TABLE_HEADER = ["workload", "rate", "seed", "policy", "class", "done", "failed", "mean TTFT s", "P99 TTFT s",
                "P99 TBT s", "mean e2e s", "tok/s", "preempt", "migr"]


def table(summaries: list[RunSummary]) -> str:
    rows = []
    for s in summaries:
        for klass, f in s.figures.items():
            if not f:
                continue
            rows.append([s.workload, f"{s.rate:g}", str(s.seed), s.policy, klass, str(s.completed), str(s.failed),
                         f"{f['mean_ttft_s']:.3f}", f"{f['p99_ttft_s']:.3f}", f"{f['p99_tbt_s']:.3f}",
                         f"{f['mean_e2e_s']:.2f}", f"{f['throughput_tok_s']:.0f}", str(s.preemptions),
                         str(s.migrations)])
    return markdown_table(TABLE_HEADER, rows)


def plot(summaries: list[RunSummary], path, title: str) -> None:
    """Mean and P99 TTFT, P99 TBT, end-to-end latency, throughput, preemptions and migrations per
    policy against the rate (the mean over seeds), as Llumnix's figures show them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean_ttft_s", "mean TTFT (s)"), ("p99_ttft_s", "P99 TTFT (s)"), ("p99_tbt_s", "P99 TBT (s)"),
              ("mean_e2e_s", "mean end-to-end (s)"), ("throughput_tok_s", "throughput (tok/s)"),
              ("preemptions", "preemptions"), ("migrations", "migrations")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    policies = sorted({s.policy for s in summaries}, key=[s.policy for s in summaries].index)
    for ax, (key, label) in zip(axes, panels):
        for policy in policies:
            runs = [s for s in summaries if s.policy == policy and s.figures.get("all")]
            rates = sorted({s.rate for s in runs})
            values = [statistics.fmean(s.row()[key] for s in runs if s.rate == r) for r in rates]
            ax.plot(rates, values, marker="o", label=policy)
        ax.set_xlabel("rate (req/s)")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
