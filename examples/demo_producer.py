"""A producer app that knows nothing of this project: plain Celery, redis-py and httpx.

Run it while ``make run`` is up. It sends a realistic burst — every charge twice, a
flaky provider, a poison message, some notifications — shows progress, then prints
what the service did with each: provider effects, skipped duplicates, retries and
dead letters, read from the service's outcome ledger and DLQ in Redis.

What to expect: every payment charged exactly once, every duplicate skipped, and the
poison message as the only DLQ entry. The provider's failures are retried, not
dead-lettered: the retry budget allows 20% of calls plus 10 retries per second. The
demo says whether that held, and exits 1 (naming what differed) when it did not.

Environment: ``RELIABLE_REDIS__URL`` (default: the embedded Redis of ``make run``),
``RELIABLE_REDIS__KEY_PREFIX`` (rel), ``SANDBOX_URL`` (http://127.0.0.1:8099).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import redis
from celery import Celery

CHARGES = 20
NOTIFICATIONS = 5
QUEUE = os.environ.get("RELIABLE_BROKER__QUEUE", "reliable")
PREFIX = os.environ.get("RELIABLE_REDIS__KEY_PREFIX", "rel")
SANDBOX = os.environ.get("SANDBOX_URL", "http://127.0.0.1:8099")
SETTLED = {"succeeded", "skipped", "dead_lettered", "revoked"}  # final ledger outcomes


def urls() -> tuple[str, str]:
    """(redis-py URL, kombu broker URL) — the embedded socket when nothing is set."""
    url = os.environ.get("RELIABLE_REDIS__URL")
    if not url:
        socket = Path(os.environ.get("RELIABLE_REDIS__DATA_DIR", ".data")).resolve()
        url = f"unix://{socket / 'redis.sock'}"
    if url.startswith("unix://"):
        path = url[len("unix://") :]
        return url, f"redis+socket://{path}"
    return url, url


def main() -> int:
    state_url, broker_url = urls()
    app = Celery("demo-producer", broker=broker_url, backend=broker_url)
    app.conf.task_default_queue = QUEUE
    r = redis.Redis.from_url(state_url, decode_responses=True)
    http = httpx.Client(base_url=SANDBOX, timeout=5)

    run = uuid.uuid4().hex[:6]
    http.post("/reset")
    http.post("/faults", json={"error_rate": 0.2, "seed": 7})  # a flaky provider
    print(
        f"demo run {run}: {CHARGES} charges sent twice, {NOTIFICATIONS} notifications, "
        "1 poison message; provider fails 20% of calls"
    )

    sent = []
    for i in range(CHARGES):
        kwargs = {"payment_id": f"{run}-pay-{i}", "amount": 500 + i, "currency": "EUR"}
        for copy in ("first", "duplicate"):
            result = app.send_task(
                "payments.charge", kwargs=kwargs, headers={"correlation_id": f"{run}-order-{i}"}
            )
            sent.append((f"charge {i} ({copy})", result))
    for i in range(NOTIFICATIONS):
        result = app.send_task(
            "notifications.send", args=[f"user-{i}", "email", f"Your order {i} shipped"]
        )
        sent.append((f"notification {i}", result))
    poison = app.send_task(
        "payments.charge", kwargs={"payment_id": f"{run}-bad", "amount": -1, "currency": "eur"}
    )
    sent.append(("poison charge", poison))

    ids = {result.id for _, result in sent}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = sum(1 for _, result in sent if result.ready())
        sys.stdout.write(f"\r  settled {done}/{len(sent)}")
        sys.stdout.flush()
        if done == len(sent):
            break
        time.sleep(0.5)
    print()

    outcomes: dict[str, list[str]] = {}
    for _, fields in r.xrange(f"{PREFIX}:ledger", min="-", max="+"):
        if fields.get("task_id") in ids:
            outcomes.setdefault(fields["task_id"], []).append(fields["outcome"])
    final = Counter(next((o for o in v if o in SETTLED), "pending") for v in outcomes.values())
    retries = sum(v.count("retried") for v in outcomes.values())
    effects = http.get("/effects").json()["effects"]
    charges = [e for e in effects if e["endpoint"] == "charges"]
    dead = [json.loads(raw) for raw in r.hgetall(f"{PREFIX}:dlq").values()]
    dead = [d for d in dead if d.get("task_id") in ids]

    print("\nwhat the service did")
    print(
        f"  provider calls to /charges : {len(charges)} "
        f"({sum(e['outcome'] == 'effect' for e in charges)} effects, "
        f"{sum(e['outcome'] == 'error' for e in charges)} injected failures)"
    )
    print(
        f"  distinct payments charged  : "
        f"{len({e['idempotency_key'] for e in charges if e['outcome'] == 'effect'})}"
        f" of {CHARGES}"
    )
    print(f"  succeeded                  : {final['succeeded']}")
    print(f"  skipped duplicates         : {final['skipped']}")
    print(f"  retries scheduled          : {retries}")
    print(f"  dead-lettered              : {final['dead_lettered']}")
    for d in dead:
        print(f"    - {d['task_name']} [{d['failure_class']}] {d['reason']}")
    print(f"  not yet settled            : {len(ids) - sum(final.values())}")
    http.post("/faults", json={"error_rate": 0.0})

    per_payment = Counter(e["idempotency_key"] for e in charges if e["outcome"] == "effect")
    problems = []
    if len(per_payment) != CHARGES or set(per_payment.values()) != {1}:
        problems.append(
            f"{len(per_payment)} of {CHARGES} payments charged, {sum(per_payment.values())} effects"
        )
    # Per payment: one copy succeeded, the other was skipped (notifications repeat across
    # runs, so theirs may be skipped too: they are not counted here).
    charge_finals = Counter(
        next((o for o in outcomes.get(result.id, []) if o in SETTLED), "pending")
        for label, result in sent
        if label.startswith("charge ")
    )
    if charge_finals != Counter({"succeeded": CHARGES, "skipped": CHARGES}):
        problems.append(
            f"charge copies: {dict(charge_finals)}, expected {CHARGES} succeeded"
            f" and {CHARGES} skipped"
        )
    others = Counter(d["failure_class"] for d in dead if d["task_id"] != poison.id)
    if others:
        problems.append(f"DLQ entries besides the poison one: {dict(others)}")
    if [d["failure_class"] for d in dead if d["task_id"] == poison.id] != ["poison"]:
        problems.append("the poison message is not in the DLQ as poison")
    if len(ids) != sum(final.values()):
        problems.append(f"{len(ids) - sum(final.values())} not settled")
    if problems:
        print("\nunexpected: " + "; ".join(problems))
        return 1
    print(
        "\nas expected: every payment charged once, every duplicate skipped, failures "
        "retried,\nand only the poison message dead-lettered"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
