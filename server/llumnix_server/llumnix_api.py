"""Llumnix operations API: what each instance of a model is doing."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from llumnix_backend.model_registry import ModelRegistry
from llumnix_backend.served_model import ServedModel


def _number(value: float | None) -> float | str | None:
    """JSON has no infinity: a draining instance's freeness (-inf) is sent as a string."""
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _rescheduling(model: ServedModel) -> dict[str, Any]:
    """Whether the rescheduler is configured and running, and the settings it follows."""
    settings = model.config.scheduler.migration
    return {
        "enabled": settings.rescheduling,
        "active": model.rescheduling_active,
        **settings.model_dump(include={"interval_s", "source_below_tokens", "destination_above_tokens",
                                       "max_in_flight_per_instance"}),
    }


def create_llumnix_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/v2/llumnix/models/{model_name}/instances")
    async def instances(model_name: str) -> dict[str, Any]:
        entry = registry.entry(model_name)
        model = entry.model
        reports = model.reports() if model is not None else []
        errors = model.instance_errors() if model is not None else {}
        in_flight = model.migrations_in_flight() if model is not None else {}
        return {
            "model": model_name,
            "state": entry.serving_state.value,
            "reason": entry.serving_reason,
            "dispatch_policy": model.config.scheduler.dispatch_policy.value if model else None,
            "rescheduling": _rescheduling(model) if model else None,
            "instances": [
                {
                    "id": r.instance_id,
                    "state": r.state,
                    "error": errors.get(r.instance_id),
                    "gpus": list(r.gpus),
                    "node": r.node,
                    "freeness": _number(r.freeness),
                    "migrations_in_flight": in_flight.get(r.instance_id, 0),
                    "snapshot": dataclasses.asdict(r.snapshot) if r.snapshot is not None else None,
                }
                for r in reports
            ],
        }

    @router.post("/v2/llumnix/models/{model_name}/instances/{instance_id}/drain")
    async def drain(model_name: str, instance_id: str) -> dict[str, Any]:
        """Stop dispatching to the instance; rescheduling migrates its running requests away."""
        model = registry.loaded(model_name)
        model.drain(instance_id)
        return {"model": model_name, "instance": instance_id, "state": "draining"}

    @router.post("/v2/llumnix/models/{model_name}/instances/{instance_id}/resume")
    async def resume(model_name: str, instance_id: str) -> dict[str, Any]:
        """Undo a drain: the instance takes new requests again."""
        model = registry.loaded(model_name)
        model.resume(instance_id)
        return {"model": model_name, "instance": instance_id, "state": "ready"}

    @router.post("/v2/llumnix/models/{model_name}/migrate")
    async def migrate(model_name: str, body: MigrateRequest) -> dict[str, Any]:
        """Move a running request (the `id` its OpenAI or KServe response carries) to another
        instance of its model, live. 4xx if it cannot start; otherwise the migration's report,
        committed or aborted with the reason (then the request goes on where it was)."""
        report = await registry.get(model_name).migrate(body.request_id, body.to, body.stage_timeout_s)
        return dataclasses.asdict(report)

    return router


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1)
    to: str = Field(min_length=1, description="an instance id as /instances lists it")
    stage_timeout_s: float | None = Field(default=None, gt=0,
                                          description="this migration's stage timeout (default: the model's)")
