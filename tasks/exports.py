"""``exports.generate``: long-running exports, cached for an hour per export id."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from reliability import ReliableTask, RetryPolicy
from tasks.provider import post
from worker.app import app, settings


class ExportArgs(BaseModel):
    export_id: str = Field(min_length=1)
    kind: Literal["csv", "json"] = "csv"
    filters: dict[str, Any] = Field(default_factory=dict)


@app.task(
    base=ReliableTask,
    name="exports.generate",
    breaker="analytics",
    rate_limits=("analytics-export",),
    idempotency_key_args=("export_id",),
    idempotency_ttl=3600,  # seed 000: data exports are cacheable for an hour
    lease_ttl=120.0,
    args_model=ExportArgs,
    retry_policy=RetryPolicy(strategy="linear", base_delay=5.0, max_delay=60.0, max_attempts=3),
)
def generate(
    export_id: str, kind: str = "csv", filters: dict[str, Any] | None = None
) -> dict[str, Any]:
    reply = post(
        f"{settings.providers.export_base_url}/exports",
        {"export_id": export_id, "kind": kind, "filters": filters or {}},
        timeout=settings.providers.timeout_seconds,
    )
    return {"export_id": export_id, "file": reply.get("id"), "kind": kind}
