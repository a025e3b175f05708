"""DLQ reprocessing with real processes: the beat job on a worker, the sandbox provider,
and ``reliable dlq reprocess`` / ``list --fingerprint`` / ``show`` as an operator runs them.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import Counter
from typing import Any

from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

SETTINGS = {
    # The breaker is exercised in tests/test_dlq_reprocess.py: here it must not open
    # while the provider is down, or the charges would wait for it instead of failing.
    "RELIABLE_BREAKERS": json.dumps({"payment": {"failure_threshold": 0}}),
    "RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND": "1000",
    "RELIABLE_REPROCESS__BACKOFF_BASE_SECONDS": "0",
}


def charge(producer: Any, payment_id: str, amount: int = 100) -> Any:
    kwargs = {"payment_id": payment_id, "amount": amount, "currency": "EUR"}
    return producer.send_task("payments.charge", kwargs=kwargs)


def effects_of(sandbox: SandboxProvider, payment_id: str) -> list[str]:
    """The outcome of every call the provider got for one payment id, in order."""
    return [
        c["outcome"] for c in sandbox.effects("charges") if c["body"]["payment_id"] == payment_id
    ]


def test_a_dlq_of_failed_charges_is_drained_once_the_provider_recovers(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    producer = environment.producer()
    dlq = DeadLetterQueue(store)
    declined, invalid = f"pay-{uuid.uuid4().hex[:8]}", f"pay-{uuid.uuid4().hex[:8]}"
    failing = [f"pay-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    with WorkerProcess(environment, concurrency=2, **SETTINGS) as worker:
        sandbox.set_faults(script=[400])
        charge(producer, declined)
        charge(producer, invalid, amount=-1)
        wait_until(lambda: dlq.count() == 2, 30, message="a permanent and a poison entry")
        sandbox.set_faults(outage=True)
        for payment_id in failing:
            charge(producer, payment_id)
        wait_until(lambda: dlq.count() == 5, 60, message="3 charges out of attempts")
        assert Counter(e.failure_class for e in dlq.iter()) == {
            "transient": 3,
            "permanent": 1,
            "poison": 1,
        }
        held = {e.id for e in dlq.iter() if e.failure_class != "transient"}
        sandbox.set_faults(outage=False)

        # Two runs of the job for two slots at once, in two pool processes.
        runs = [
            producer.send_task("maintenance.dlq_reprocess", kwargs={"slot": slot})
            for slot in (1, 2)
        ]
        replies = [run.get(timeout=60) for run in runs]
        assert [r["ran"] for r in replies] == [True, True]
        assert sum(r["redrive"] for r in replies) == 3
        assert sum(r["alerted"] for r in replies) == 2

        new_ids = store.client.hkeys(dlq.redrives.audit)
        assert len(new_ids) == 3
        ledger = Ledger(store)
        wait_until(
            lambda: ledger.reconcile(new_ids).count("succeeded") == 3,
            30,
            message="the redriven charges succeed",
        )
        third = producer.send_task("maintenance.dlq_reprocess", kwargs={"slot": 3}).get(timeout=60)
        assert (third["redrive"], third["hold"], third["alerted"]) == (0, 2, 0)

    # Each failed charge: 5 refused attempts, then exactly one effect after the redrive.
    for payment_id in failing:
        assert effects_of(sandbox, payment_id) == ["outage"] * 5 + ["effect"]
    assert effects_of(sandbox, declined) == ["rejected"]
    assert effects_of(sandbox, invalid) == []
    assert {e.id for e in dlq.iter()} == held
    redriven = [r for r in ledger.entries() if r["outcome"] == "redriven"]
    assert Counter(r["task"] for r in redriven) == {"payments.charge": 3}
    assert len({r["detail"] for r in redriven}) == 3
    assert worker.log_text().count('"dlq_entry_held"') == 2


def reliable(env: Environment, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, "dlq", *args)


def test_the_cli_reprocesses_dry_runs_and_filters_by_fingerprint(
    environment: Environment, store: Store
) -> None:
    dlq = DeadLetterQueue(store)
    an_hour_ago = time.time() - 3600

    def entry(failure_class: str, message: str, **fields: Any) -> DeadLetter:
        payment = {"payment_id": f"pay-{uuid.uuid4().hex[:8]}", "amount": 100, "currency": "EUR"}
        fields.setdefault("task_id", uuid.uuid4().hex)
        return DeadLetter(
            task_name="payments.charge",
            failure_class=failure_class,
            kwargs=payment,
            exception_type="TransientError",
            exception_message=message,
            last_failure_at=an_hour_ago,
            **fields,
        )

    transient = [entry("transient", f"timeout after {n}s") for n in (10, 30)]
    poison = entry("poison", "amount must be > 0")
    for e in [*transient, poison]:
        dlq.add(e, Ledger(store))

    dry = reliable(environment, "reprocess", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert (report["redrive"], report["hold"], report["alerted"]) == (2, 1, 1)
    assert report["fingerprints"][transient[0].fingerprint]["entries"] == 2
    assert dlq.count() == 3

    listed = reliable(environment, "list", "--fingerprint", transient[0].fingerprint)
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines()[:-1]} == {
        e.id for e in transient
    }
    bad = reliable(environment, "list", "--fingerprint", "not-hex")
    assert bad.returncode == 2 and "12 hex digits" in bad.stderr

    done = reliable(environment, "reprocess")
    assert done.returncode == 0, done.stderr
    assert "redrive 2, hold 1, wait 0, skip 0; alert 1" in done.stdout
    assert {e.id for e in dlq.iter()} == {poison.id}

    # A redriven charge that fails again is a new entry: `show` prints its trail.
    [new_id, _] = store.client.hkeys(dlq.redrives.audit)
    again = entry("transient", "timeout after 5s", task_id=new_id, redrive_count=1)
    dlq.add(again, Ledger(store))
    shown = reliable(environment, "show", again.id)
    assert shown.returncode == 0, shown.stderr
    [trail] = json.loads(shown.stdout)["redrives"]
    assert trail["task_id"] == new_id and trail["by"].startswith("cli:")
    assert trail["entry_id"] in {e.id for e in transient} and trail["at"].endswith("Z")
