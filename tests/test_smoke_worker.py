"""A real worker runs a reliable task end to end (the trunk's first proof)."""

from __future__ import annotations

from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess


def test_duplicate_charges_call_the_provider_once_per_payment(
    environment: Environment, sandbox, store: Store
) -> None:
    producer = environment.producer()
    with WorkerProcess(environment, concurrency=2):
        results = [
            producer.send_task(
                "payments.charge", kwargs={"payment_id": f"p{i}", "amount": 100, "currency": "EUR"}
            )
            for i in range(5)
            for _ in range(2)
        ]
        values = [r.get(timeout=30) for r in results]
    assert [v["payment_id"] for v in values] == [f"p{i}" for i in range(5) for _ in range(2)]
    assert len(sandbox.effects(endpoint="charges")) == 5
    rec = Ledger(store).reconcile([r.id for r in results])
    assert rec.lost == 0
    assert rec.count("succeeded") == 5 and rec.count("skipped") == 5
