"""What the terminal shows while models load: a line per instance event, then a summary table."""

from __future__ import annotations

import sys
from typing import TextIO

from llumnix_backend.model_registry import ModelRegistry
from llumnix_backend.plugin import InstanceState
from llumnix_backend.served_model import InstanceEvent


class StartupReport:
    def __init__(self, base_url: str, grpc_address: str | None = None, out: TextIO = sys.stdout) -> None:
        self._base_url = base_url
        self._grpc = f", KServe v2 gRPC {grpc_address}" if grpc_address else ""
        self._out = out

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)

    def instance_event(self, event: InstanceEvent) -> None:
        name = f"{event.model}/{event.instance_id}"
        if event.state is InstanceState.STARTING and event.phase is not None:
            after = f"after {event.seconds:.0f} s: " if event.seconds else ""
            self._print(f"[llumnix] {name}: {after}{event.phase}")
        elif event.state is InstanceState.STARTING:
            where = f" on GPU {','.join(map(str, event.gpus))}" if event.gpus else ""
            self._print(f"[llumnix] {name}: starting engine{where}")
        elif event.state is InstanceState.READY:
            where = f" on Ray node {event.node}" if event.node else ""
            self._print(f"[llumnix] {name}: ready in {event.seconds:.1f} s{where}")
        else:
            self._print(f"[llumnix] {name}: FAILED after {event.seconds:.1f} s: {event.error}")

    def summary(self, registry: ModelRegistry) -> None:
        rows = [("MODEL", "STATE", "INSTANCES", "DISPATCH", "GPUS", "REASON")]
        for entry in registry.entries():
            model = entry.model
            instances, dispatch, gpus = "-", "-", "-"
            if model is not None:
                reports = model.reports()
                states = [r.state for r in reports]
                instances = f"{states.count('ready')}/{len(states)} ready"
                dispatch = model.config.scheduler.dispatch_policy.value
                # One group per instance: "0/1" is one GPU each, "0,1/2,3" two each.
                gpus = "/".join(",".join(map(str, r.gpus)) for r in reports if r.gpus) or "-"
            rows.append((entry.name, entry.state.value, instances, dispatch, gpus, entry.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        self._print("")
        for row in rows:
            self._print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5])
        self._print("")
        self._print(
            f"[llumnix] serving {len(registry.ready_models())} model(s) on {self._base_url}: "
            f"OpenAI {self._base_url}/v1, KServe v2 {self._base_url}/v2{self._grpc}, metrics {self._base_url}/metrics"
        )
