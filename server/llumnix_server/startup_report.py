"""What the terminal shows while models load: a line per instance event, then a summary table."""

from __future__ import annotations

import sys
from typing import TextIO

from llumnix_backend.model_registry import ModelRegistry
from llumnix_backend.plugin import InstanceState
from llumnix_backend.served_model import InstanceEvent


class StartupReport:
    def __init__(self, base_url: str, out: TextIO = sys.stdout) -> None:
        self._base_url = base_url
        self._out = out

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)

    def instance_event(self, event: InstanceEvent) -> None:
        name = f"{event.model}/{event.instance_id}"
        if event.state is InstanceState.STARTING:
            self._print(f"[llumnix] {name}: starting engine")
        elif event.state is InstanceState.READY:
            self._print(f"[llumnix] {name}: ready in {event.seconds:.1f} s")
        else:
            self._print(f"[llumnix] {name}: FAILED after {event.seconds:.1f} s: {event.error}")

    def summary(self, registry: ModelRegistry) -> None:
        rows = [("MODEL", "STATE", "INSTANCES", "DISPATCH", "REASON")]
        for entry in registry.entries():
            model = entry.model
            if model is None:
                instances, dispatch = "-", "-"
            else:
                states = [r.state for r in model.reports()]
                instances = f"{states.count('ready')}/{len(states)} ready"
                dispatch = model.config.scheduler.dispatch_policy.value
            rows.append((entry.name, entry.state.value, instances, dispatch, entry.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        self._print("")
        for row in rows:
            self._print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
        self._print("")
        self._print(
            f"[llumnix] serving {len(registry.ready_models())} model(s) on {self._base_url}: "
            f"OpenAI {self._base_url}/v1, KServe v2 {self._base_url}/v2, metrics {self._base_url}/metrics"
        )
