"""Llumnix operations API: what each instance of a model is doing."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fastapi import APIRouter

from llumnix_backend.model_registry import ModelRegistry


def _number(value: float | None) -> float | str | None:
    """JSON has no infinity: a draining instance's freeness (-inf) is sent as a string."""
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def create_llumnix_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/v2/llumnix/models/{model_name}/instances")
    async def instances(model_name: str) -> dict[str, Any]:
        entry = registry.entry(model_name)
        model = entry.model
        reports = model.reports() if model is not None else []
        errors = model.instance_errors() if model is not None else {}
        return {
            "model": model_name,
            "state": entry.state.value,
            "dispatch_policy": model.config.scheduler.dispatch_policy.value if model else None,
            "instances": [
                {
                    "id": r.instance_id,
                    "state": r.state,
                    "error": errors.get(r.instance_id),
                    "freeness": _number(r.freeness),
                    "snapshot": dataclasses.asdict(r.snapshot) if r.snapshot is not None else None,
                }
                for r in reports
            ],
        }

    return router
