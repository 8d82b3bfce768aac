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
        """One class's figures (its own request counts; the instance counters are the run's)."""
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
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
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
            rows.append([s.workload, f"{s.rate:g}", str(s.seed), s.policy, klass, str(f["completed"]), str(f["failed"]),
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


def target_ratios(runs: list[dict]) -> list[dict]:
    """Per rate and seed, llumnix (with rescheduling) over each baseline, as issue 9's targets
    ask: P99 TTFT against queue and round robin, preemptions and throughput against round
    robin, and with a high-priority share, the high-priority and normal requests' P99 TTFT
    against the same requests with priorities off."""
    by_key = {(r["policy"], r["rate"], r["seed"], r["class"]): r for r in runs}
    ratio = lambda a, b: a / b if b else (0.0 if a == 0 else float("inf"))  # noqa: E731
    out = []
    for rate, seed in sorted({(r["rate"], r["seed"]) for r in runs}):
        get = lambda policy, klass="all": by_key.get((policy, rate, seed, klass))  # noqa: E731
        ours, rr, queue = get("llumnix"), get("round_robin"), get("queue")
        if not (ours and rr and queue):
            continue
        row = {"rate": rate, "seed": seed, "rr_completed_all": rr["failed"] == 0,
               "p99_ttft_vs_queue": ratio(ours["p99_ttft_s"], queue["p99_ttft_s"]),
               "p99_ttft_vs_round_robin": ratio(ours["p99_ttft_s"], rr["p99_ttft_s"]),
               "preemptions_vs_round_robin": ratio(ours["preemptions"], rr["preemptions"]),
               "throughput_vs_round_robin": ratio(ours["throughput_tok_s"], rr["throughput_tok_s"])}
        for klass in ("high", "normal"):
            on, off = get("llumnix", klass), get("llumnix (priorities off)", klass)
            if on and off:
                row[f"{klass}_p99_ttft_vs_priorities_off"] = ratio(on["p99_ttft_s"], off["p99_ttft_s"])
        out.append(row)
    return out


def ratios_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("rate", "seed")))
    cell = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    return markdown_table(["rate", "seed", *keys],
                          [[f"{r['rate']:g}", str(r["seed"]), *(cell(r.get(k)) for k in keys)] for r in rows])


def summaries_from_rows(runs: list[dict]) -> list[RunSummary]:
    """The summaries a report's rows were made from (its figures per class)."""
    summaries: dict[tuple, RunSummary] = {}
    for r in runs:
        key = (r["policy"], r["workload"], r["rate"], r["seed"])
        if key not in summaries:
            summaries[key] = RunSummary(*key, r["completed"], r["failed"], r["preemptions"], r["migrations"], 0.0)
        summaries[key].figures[r["class"]] = {k: v for k, v in r.items() if k.endswith(("_s", "_tok_s"))}
    return list(summaries.values())


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    # python benchmarks/policy_report.py docs/benchmarks/NAME.json: a report's target ratios, and
    # its plot drawn again (NAME.png), e.g. for a sweep that was cut short.
    path = Path(sys.argv[1])
    report = json.loads(path.read_text())
    print(ratios_table(target_ratios(report["runs"])))
    plot(summaries_from_rows(report["runs"]), path.with_suffix(".png"), report["command"][:120])
