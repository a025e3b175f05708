"""``notifications.send``: a message is sent once per 15-minute dedup window."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from reliability import ReliableTask, RetryPolicy
from tasks.provider import post
from worker.app import app, settings


class SendArgs(BaseModel):
    user_id: str = Field(min_length=1)
    channel: Literal["email", "sms", "push", "telegram"]
    message: str = Field(min_length=1, max_length=4096)


@app.task(
    base=ReliableTask,
    name="notifications.send",
    breaker="notification",
    rate_limits=("notification-per-user",),
    idempotent=True,
    # Message bodies hold one-time codes and personal data: shown as ***.
    sensitive_args=("message",),
    idempotency_ttl=15 * 60,  # seed 000: 10-30 minutes for notifications
    args_model=SendArgs,
    retry_policy=RetryPolicy(
        strategy="exponential", base_delay=2.0, max_delay=120.0, max_attempts=4, jitter="equal"
    ),
)
def send(user_id: str, channel: str, message: str) -> dict[str, Any]:
    providers = settings.providers
    key = providers.notification_api_key
    reply = post(
        f"{providers.notification_base_url}/notifications",
        {"user_id": user_id, "channel": channel, "message": message},
        timeout=providers.timeout_seconds,
        api_key=key.get_secret_value() if key else None,
    )
    return {"user_id": user_id, "notification_id": reply.get("id"), "status": "sent"}
