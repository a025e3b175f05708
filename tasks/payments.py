"""``payments.charge``: one charge per payment id, whatever the broker redelivers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from reliability import ReliableTask, RetryPolicy
from tasks.provider import post
from worker.app import app, settings


class ChargeArgs(BaseModel):
    payment_id: str = Field(min_length=1)
    amount: int = Field(gt=0, description="minor units (cents)")
    currency: str = Field(pattern=r"^[A-Z]{3}$")


@app.task(
    base=ReliableTask,
    name="payments.charge",
    breaker="payment",
    rate_limits=("payment-gateway",),
    idempotency_key_args=("payment_id",),
    idempotency_ttl=4 * 3600,  # seed 000: 2-4 hours for payments
    args_model=ChargeArgs,
    retry_policy=RetryPolicy(
        strategy="exponential", base_delay=1.0, max_delay=60.0, max_attempts=5
    ),
)
def charge(payment_id: str, amount: int, currency: str) -> dict[str, Any]:
    providers = settings.providers
    key = providers.payment_api_key
    reply = post(
        f"{providers.payment_base_url}/charges",
        {"payment_id": payment_id, "amount": amount, "currency": currency},
        timeout=providers.timeout_seconds,
        api_key=key.get_secret_value() if key else None,
    )
    return {"payment_id": payment_id, "charge_id": reply.get("id"), "status": "charged"}
