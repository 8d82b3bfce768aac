"""Fit the simulator's step-time model to steps measured on real engines.

Engines started with `LLUMNIX_STEP_TRACE_DIR` (e.g. `policy_eval.py --step-trace DIR`) write one
row per step: its duration, prompt tokens computed, decoding requests and their context. This
fits `step_s = base + a * prefill_tokens + b * decode_seqs + c * context_tokens` by least
squares (coefficients kept non-negative), reports how well it fits, and writes the profile
(with the engine limits and the migration costs given here) for the simulator.

    python benchmarks/step_profile.py TRACE_DIR --name cpu-tiny --blocks 127 --block-size 128
        --max-num-batched-tokens 2048 --max-num-seqs 64 --migration docs/benchmarks/migration.json

Migration costs: a line through `migration_downtime.py`'s per-length results (whole migration
and the client's downtime against blocks moved).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from llumnix_backend.simulator.profile import PROFILES, EngineProfile

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import command_line  # noqa: E402

COLUMNS = ("prefill_tokens", "decode_seqs", "context_tokens")


def read_steps(folder: Path) -> np.ndarray:
    rows = []
    for path in sorted(folder.glob("steps-*.csv")):
        with path.open() as f:
            rows += [[float(r["step_s"]), *(float(r[c]) for c in COLUMNS)] for r in csv.DictReader(f)]
    if not rows:
        raise SystemExit(f"no steps-*.csv with rows in {folder}")
    return np.array(rows)


def fit(steps: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Non-negative least squares by elimination: refit without any coefficient that comes out
    negative. Returns [base, per prefill token, per decode request, per context token]."""
    y, x = steps[:, 0], np.column_stack([np.ones(len(steps)), steps[:, 1:]])
    keep = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (coef >= 0).all():
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(x.shape[1])
    full[keep] = coef
    predicted = x @ full
    error = np.abs(predicted - y) / np.maximum(y, 1e-6)
    quality = {"steps": int(len(y)), "r2": float(1 - ((y - predicted) ** 2).sum() / ((y - y.mean()) ** 2).sum()),
               "median_relative_error": float(np.median(error)),
               "mean_step_ms_measured": float(y.mean() * 1e3), "mean_step_ms_fitted": float(predicted.mean() * 1e3)}
    return full, quality


def migration_costs(path: Path | None) -> tuple[float, float, float, float]:
    """(whole migration: base, per block; downtime: base, per block) in seconds."""
    if path is None:
        return 0.0, 0.0, 0.0, 0.0
    results = json.loads(path.read_text())["results"].values()
    blocks = np.array([r["blocks"] for r in results], dtype=float)
    line = lambda key: np.polyfit(blocks, [r[key] / 1e3 for r in results], 1)  # noqa: E731
    (m_slope, m_base), (d_slope, d_base) = line("migration_total_ms"), line("client_downtime_ms")
    return max(0.0, m_base), max(0.0, m_slope), max(0.0, d_base), max(0.0, d_slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--blocks", type=int, required=True)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--max-num-batched-tokens", type=int, required=True)
    parser.add_argument("--max-num-seqs", type=int, required=True)
    parser.add_argument("--migration", type=Path)
    parser.add_argument("--source", default="", help="what was measured, on which machine")
    args = parser.parse_args()
    coef, quality = fit(read_steps(args.trace_dir))
    m_base, m_block, d_base, d_block = migration_costs(args.migration)
    profile = EngineProfile(
        name=args.name, total_blocks=args.blocks, block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        base_s=float(coef[0]), prefill_token_s=float(coef[1]), decode_seq_s=float(coef[2]),
        context_token_s=float(coef[3]), migration_base_s=m_base, migration_block_s=m_block,
        downtime_base_s=d_base, downtime_block_s=d_block,
        source=f"{args.source}; fit: {json.dumps(quality)}; command: {command_line()}")
    (PROFILES / f"{args.name}.json").write_text(profile.to_json())
    print(json.dumps({"profile": args.name, "fit": quality, "coefficients": profile.__dict__}, indent=2))


if __name__ == "__main__":
    main()
