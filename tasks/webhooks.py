"""``webhooks.deliver``: each event reaches each URL once; receivers get the event id."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from reliability import ReliableTask, RetryPolicy
from tasks.provider import post
from worker.app import app, settings


class DeliverArgs(BaseModel):
    url: str = Field(pattern=r"^https?://")
    event_id: str = Field(min_length=1)
    payload: dict[str, Any]


@app.task(
    base=ReliableTask,
    name="webhooks.deliver",
    dependency="webhooks",
    idempotency_key_args=("url", "event_id"),
    idempotency_ttl=24 * 3600,
    args_model=DeliverArgs,
    retry_policy=RetryPolicy(
        strategy="decorrelated", base_delay=1.0, max_delay=300.0, max_attempts=8
    ),
)
def deliver(url: str, event_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    post(
        url, {"event_id": event_id, "payload": payload}, timeout=settings.providers.timeout_seconds
    )
    return {"event_id": event_id, "delivered": True}
