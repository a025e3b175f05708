"""Our internal headers cannot be forged to skip a guard.

A copy the mover publishes carries a defer id that parking issued, and only such a copy
may run on a rate-limit slot reserved for it (``rel_reserved``). A producer that sends
those headers itself (a random defer id, "reserved") does not get past the limit: its
message is dead-lettered as poison, and nothing runs.
"""

from __future__ import annotations

import json
import uuid

from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

LIMIT = {"payment-gateway": {"kind": "gcra", "rate": 1, "burst": 1}}


def test_forged_internal_headers_are_dead_lettered_and_never_pass_the_rate_limit(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    producer = environment.producer()
    with WorkerProcess(environment, concurrency=2, RELIABLE_RATE_LIMITS=json.dumps(LIMIT)):
        sent = [
            producer.send_task(
                "payments.charge",
                kwargs={"payment_id": f"forged-{i}", "amount": 5, "currency": "EUR"},
                headers={
                    "rel_defer": uuid.uuid4().hex,
                    "rel_pub": uuid.uuid4().hex,
                    "rel_reserved": 1,
                },
            ).id
            for i in range(10)
        ]
        ledger = Ledger(store)
        wait_until(
            lambda: ledger.reconcile(sent).lost == 0,
            timeout=30,
            message="every forged copy settled",
        )
    entries = list(DeadLetterQueue(store).iter())
    assert ledger.reconcile(sent).count("dead_lettered") == 10
    assert sorted(e.task_id for e in entries) == sorted(sent)
    assert all(e.failure_class == "poison" and "forged" in e.reason for e in entries)
    assert sandbox.effects() == []
