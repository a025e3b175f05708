"""Known secrets sent through the four business tasks reach no event, log line, DLQ
entry, stored result or Redis key name.

A real prefork worker and a real Flower (``celery -A worker.app flower``) run; the
producer is plain Celery. Covered on the way: a webhook URL with a password and a
payload holding ``api_key`` (one delivered, one failing into the DLQ as permanent), a
notification whose body is a declared sensitive argument, an export filtered by a token,
a charge whose payment id holds a card number, and a charge retried once (the mover
republishes it: its ``task-sent`` event and headers come from this service). Flower
must show every task, so the scan is not vacuous.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from reliability.dlq import DeadLetterQueue
from reliability.store import Store
from tests.support.fleet import Environment, FlowerProcess, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

CONFIGURED_KEY = "sk_live_fleetconfigured_0123456789"
CARD = "4111 1111 1111 1111"
RETRY_CARD = "5555 5555 5555 4444"
OTP = "otp-SENTINEL-7f3a9c"
URL_PASSWORD = "s3cretpw"
PAYLOAD_KEY = "ak_payload_SENTINEL_9c1d"
EXPORT_TOKEN = "tok_export_SENTINEL_55aa"
SECRETS = (
    CONFIGURED_KEY,
    CARD,
    CARD.replace(" ", ""),
    RETRY_CARD,
    RETRY_CARD.replace(" ", ""),
    OTP,
    URL_PASSWORD,
    PAYLOAD_KEY,
    EXPORT_TOKEN,
)
# Plain argument values: shown in Flower and logs, but never part of a key name.
USER_ID = "u-SENTINEL-user"
EVENT_ID = "evt-SENTINEL-1"
EXPORT_ID = "exp-SENTINEL-1"
KEY_NAME_VALUES = (*SECRETS, USER_ID, EVENT_ID, EXPORT_ID, "pay-")


@pytest.fixture
def worker(environment: Environment) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        environment, concurrency=2, RELIABLE_PROVIDERS__PAYMENT_API_KEY=CONFIGURED_KEY
    ) as process:
        yield process


@pytest.fixture
def flower(environment: Environment, worker: WorkerProcess) -> Iterator[FlowerProcess]:
    with FlowerProcess(environment) as process:
        yield process


def _hits(text: str, values: tuple[str, ...]) -> list[str]:
    return [value for value in values if value in text]


def test_secrets_sent_through_every_business_task_reach_no_event_log_dlq_or_key_name(
    environment: Environment,
    sandbox: SandboxProvider,
    worker: WorkerProcess,
    flower: FlowerProcess,
    store: Store,
) -> None:
    producer = environment.producer()
    # Flower consumes events from when it connects: wait until it sees a first task.
    warmup = producer.send_task("exports.generate", kwargs={"export_id": "warmup", "filters": {}})
    warmup.get(timeout=30)
    wait_until(lambda: warmup.id in flower.tasks(), 30, message="flower sees events")

    hook = f"http://hookuser:{URL_PASSWORD}@127.0.0.1:{sandbox.port}"
    payload = {"api_key": PAYLOAD_KEY, "note": "order shipped"}
    sent = {
        "charge": producer.send_task(
            "payments.charge",
            kwargs={"payment_id": f"pay-{CARD}", "amount": 1999, "currency": "EUR"},
        ),
        "notify": producer.send_task(
            "notifications.send",
            kwargs={"user_id": USER_ID, "channel": "sms", "message": f"Your code: {OTP}"},
        ),
        "webhook": producer.send_task(
            "webhooks.deliver",
            kwargs={"url": f"{hook}/webhooks/orders", "event_id": EVENT_ID, "payload": payload},
        ),
        "export": producer.send_task(
            "exports.generate",
            kwargs={"export_id": EXPORT_ID, "filters": {"token": EXPORT_TOKEN, "region": "eu"}},
        ),
        # No route at this path: 404, a permanent failure, dead-lettered at once.
        "failing": producer.send_task(
            "webhooks.deliver",
            kwargs={
                "url": f"{hook}/nowhere/{uuid.uuid4().hex}",
                "event_id": "evt-2",
                "payload": payload,
            },
        ),
    }
    for name in ("charge", "notify", "webhook", "export"):
        sent[name].get(timeout=30)
    assert type(sent["failing"].get(timeout=30, propagate=False)).__name__ == "PermanentError"
    # One 503, then success: the charge is parked and republished by the mover.
    sandbox.set_faults(script=[503])
    sent["retried"] = producer.send_task(
        "payments.charge",
        kwargs={"payment_id": f"pay-{RETRY_CARD}", "amount": 500, "currency": "EUR"},
    )
    assert sent["retried"].get(timeout=60)["status"] == "charged"

    # Flower saw every task, with its (masked) arguments.
    ids = {result.id for result in sent.values()}

    def settled() -> dict[str, Any] | None:
        tasks = flower.tasks()
        done = ids <= set(tasks) and all(
            tasks[i].get("state") in ("SUCCESS", "FAILURE") for i in ids
        )
        return tasks if done else None

    seen = wait_until(settled, 30, message="flower has every task settled")
    flower_text = json.dumps(seen)
    assert _hits(flower_text, SECRETS) == []
    assert seen[sent["notify"].id]["kwargs"].count("'***'") == 1  # the sensitive message
    assert "hookuser:***@" in seen[sent["failing"].id]["exception"]

    # The worker's log lines (Celery's own included: received, succeeded, raised).
    log_text = worker.log_text()
    assert "task_dead_lettered" in log_text and "] received" in log_text
    assert _hits(log_text, SECRETS) == []

    # The DLQ: one entry, the failing webhook, nothing in clear, refused for redrive.
    entries = DeadLetterQueue(store).page()
    assert [(e.task_id, e.failure_class) for e in entries] == [(sent["failing"].id, "permanent")]
    assert entries[0].masked_args == ["url", "payload"]
    assert _hits(json.dumps([e.to_json() for e in entries]), SECRETS) == []

    # Redis: no key name under the test's prefixes (state store and broker) holds a
    # secret or an argument value; stored results (result_extended: with arguments)
    # hold no secret.
    client = redis.Redis.from_url(environment.redis_url, decode_responses=True)
    names = list(client.scan_iter(match=f"{environment.name}*", count=1000))
    assert any(":idem:" in n for n in names) and any(":rl:" in n for n in names)
    assert [n for n in names if _hits(n, KEY_NAME_VALUES)] == []
    metas = [client.get(n) or "" for n in names if "celery-task-meta-" in n]
    assert len(metas) >= len(sent) and _hits("".join(metas), SECRETS) == []

    # Each business call reached the provider once (the retried charge twice: 503, 200).
    calls = {
        endpoint: len(sandbox.effects(endpoint))
        for endpoint in ("charges", "notifications", "webhooks", "exports")
    }
    assert calls == {"charges": 3, "notifications": 1, "webhooks": 1, "exports": 2}
