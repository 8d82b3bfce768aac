"""What a simulated instance is: its engine limits, a fitted step-time model, migration costs.

A profile is data (`profiles/*.json`), fitted from steps measured on real engines by
`benchmarks/step_profile.py` and from `benchmarks/migration_downtime.py`'s figures:

    step_s = base_s + prefill_token_s * prefill tokens + decode_seq_s * decoding requests
             + context_token_s * tokens of context the decoding requests attend to
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

PROFILES = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class EngineProfile:
    name: str
    # Engine limits (vLLM's): KV blocks and their size, the per-step token budget, the batch.
    total_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    # Step time.
    base_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_token_s: float
    # Migration: the whole migration (stages while the request keeps decoding) and the pause at
    # the switch, each a fixed part plus a part per KV block moved.
    migration_base_s: float
    migration_block_s: float
    downtime_base_s: float
    downtime_block_s: float
    source: str = ""  # where the figures come from (command, machine)
    # vLLM 0.26 under async scheduling with a KV connector that loads (Llumnix's, before it
    # turned this off): a preempted request that ran in the step before gives its blocks back
    # only after the next step, so the preemption frees nothing now and the scheduler preempts
    # the next victim (vllm#49674).
    defers_frees: bool = False

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        return (self.base_s + self.prefill_token_s * prefill_tokens + self.decode_seq_s * decode_seqs
                + self.context_token_s * context_tokens)

    def migration_time(self, blocks: int) -> float:
        return self.migration_base_s + self.migration_block_s * blocks

    def downtime(self, blocks: int) -> float:
        return self.downtime_base_s + self.downtime_block_s * blocks

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def load_profile(name_or_path: str | Path) -> EngineProfile:
    """A profile by name (`profiles/NAME.json`) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.json"
    return EngineProfile(**json.loads(path.read_text()))
