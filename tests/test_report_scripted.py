"""A scripted hour, compressed: the report's counts equal what the provider and the
ledger recorded.

A real worker (solo pool, so calls reach the sandbox in order) charges 20 payments
against the sandbox provider scripted to answer 402 once and then 503 three times: the
first charge is dead-lettered ``permanent``, the next three fail, open the payment
breaker (threshold 3, recovery 1 s) and are retried, the rest are deferred while it is
open and run once it closed. A poison charge (negative amount) is dead-lettered
unrun, and 5 duplicates of finished charges are skipped. The report for an hour that
ends just after the workload (a ``period_end``) must show exactly those numbers; then
the beat job, run through the worker for the hour holding the workload, stores a report
that ``reliable report --json`` prints.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from reliability.analytics import BUCKETS, bucket_of
from reliability.ledger import Ledger
from reliability.reports import Period, ReportConfig, ReportStore, build_report, render
from reliability.reports.totals import percentile
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import Environment, WorkerProcess, delete_prefix, wait_until
from worker.sandbox import SandboxProvider

CHARGES = 20
DUPLICATES = 5
TASK = "payments.charge"
SETTINGS = {
    "RELIABLE_BREAKERS": json.dumps(
        {
            "payment": {
                "failure_threshold": 3,
                "recovery_timeout_seconds": 1,
                "half_open_max_calls": 1,
                "success_threshold": 1,
            }
        }
    ),
    "RELIABLE_REPORTS__OBJECTIVES": json.dumps({TASK: 0.99}),
}


@pytest.fixture
def env(redis_url: str, sandbox: SandboxProvider) -> Iterator[Environment]:
    environment = Environment(redis_url=redis_url, sandbox_url=sandbox.url, extra=SETTINGS)
    yield environment
    delete_prefix(redis_url, environment.prefix)


def charge(producer: Any, n: int, amount: int | None = None) -> str:
    kwargs = {
        "payment_id": f"pay-{n}",
        "amount": 1000 + n if amount is None else amount,
        "currency": "EUR",
    }
    return str(producer.send_task(TASK, kwargs=kwargs).id)


def settle(ledger: Ledger, ids: list[str]) -> None:
    wait_until(lambda: ledger.reconcile(ids).lost == 0, 60, 0.2, "every charge settled")


def test_the_report_of_a_scripted_hour_equals_the_provider_and_the_ledger(
    env: Environment, sandbox: SandboxProvider
) -> None:
    store = Store(env.redis_url, env.prefix)
    ledger = Ledger(store)
    sandbox.set_faults(script=[402, 503, 503, 503], latency_seconds=0.01)
    producer = env.producer()
    with WorkerProcess(env, concurrency=1, pool="solo"):
        first = [charge(producer, n) for n in range(CHARGES)]
        first.append(charge(producer, CHARGES, amount=-5))  # poison: invalid arguments
        settle(ledger, first)
        duplicates = [charge(producer, n) for n in range(1, DUPLICATES + 1)]
        settle(ledger, duplicates)
        end = store.now() + 0.01
        report = build_report(
            store,
            Period.ending("hour", 3600, end),
            dependencies={TASK: "payment"},
            config=ReportConfig(objectives={TASK: 0.99}),
        )
        # The beat job, run by the worker for the hour that holds the end of the workload.
        slot = math.floor(end / 3600) + 1
        reply = producer.send_task("maintenance.report_hourly", kwargs={"slot": slot}).get(30)
    print(render(report))

    # What the provider recorded.
    calls = sandbox.effects(endpoint="charges")
    effects = [c for c in calls if c["outcome"] == "effect"]
    unavailable = [c for c in calls if c["status"] == 503]
    declined = [c for c in calls if c["status"] == 402]
    assert (len(effects), len(unavailable), len(declined)) == (CHARGES - 1, 3, 1)
    assert len({c["idempotency_key"] for c in effects}) == CHARGES - 1
    # What the ledger recorded.
    rows = [r for r in ledger.entries() if r["task"] == TASK]
    outcomes = Counter(r["outcome"] for r in rows)
    deferred = Counter(r["detail"] for r in rows if r["outcome"] == "deferred")
    final = {
        r["task_id"]: int(r["attempt"])
        for r in rows
        if r["outcome"] in ("succeeded", "dead_lettered")
    }
    durations = sorted(float(r["duration"]) for r in rows if r.get("duration"))

    c = report["tasks"][TASK]
    assert c["received"] == len(rows) == sum(outcomes.values())
    assert c["succeeded"] == outcomes["succeeded"] == len(effects) == CHARGES - 1
    assert c["retried"] == outcomes["retried"] == len(unavailable) == 3
    assert c["failed"] == len(unavailable) + len(declined) == 4
    assert c["deduplicated"] == outcomes["skipped"] == DUPLICATES
    assert c["deferred"] == dict(deferred) and deferred["breaker_open"] > 0
    assert c["dead_lettered"] == outcomes["dead_lettered"] == 2
    assert c["dead_lettered_by_class"] == {"permanent": 1, "poison": 1}
    assert c["logical_tasks"] == len(final) == CHARGES + 1
    # Three charges took two attempts — or one took three and another one, when a retry
    # came back before the next charge's first call: the buckets come from the ledger.
    assert c["attempts_histogram"] == {
        label: sum(1 for a in final.values() if bucket_of(a) == label) for label, _, _ in BUCKETS
    }
    assert c["retry_amplification"] == round(sum(final.values()) / len(final), 4) == 1.1429
    assert c["success_rate"] == round((CHARGES - 1) / (CHARGES + 1), 6)
    # Run times: every attempt whose body ran (19 successes, 3 retries, the 402).
    assert len(durations) == 23
    assert c["run_time_seconds"] == {
        "samples": 23,
        **{f"p{p}": percentile(durations, p) for p in (50, 95, 99)},
    }
    assert min(durations) >= 0.01, "the provider's latency is inside the body's run time"
    assert c["slo"] == {
        "objective": 0.99,
        "burn_rate": round((2 / 21) / 0.01, 4),
        "status": "burning",
    }

    # The breaker, from its transitions stream.
    events = store.client.xrange(f"{env.prefix}:cb:events")
    moves = [(e["from"], e["to"], float(e["at"])) for _, e in events]
    assert [(a, b) for a, b, _ in moves] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    breaker = report["dependencies"]["payment"]["breaker"]
    assert (breaker["flaps"], breaker["transitions"], breaker["state_at_end"]) == (1, 3, "closed")
    assert breaker["open_seconds"] == round(moves[1][2] - moves[0][2], 3)
    assert report["dependencies"]["payment"]["received"] == c["received"]

    # The DLQ: both entries of the period, one fingerprint each.
    assert (report["dlq"]["inflow"], report["dlq"]["outflow"], report["dlq"]["size"]) == (2, 0, 2)
    assert sorted((g["count"], g["failure_classes"][0]) for g in report["top_fingerprints"]) == [
        (1, "permanent"),
        (1, "poison"),
    ]
    assert report["anomalies"] == [] and report["spikes"] == []

    # The job's report (the hour holding the workload's end) matches the ledger of its hour.
    assert reply["ran"] is True and reply["status"] == "ok", reply
    job_period = Period.of_slot("hour", 3600, slot)
    stored = ReportStore(store).latest("hour")
    assert stored is not None and stored["start"] == reply["start"]
    in_hour = Counter(
        r["outcome"]
        for r in ledger.entries()
        if r["task"] == TASK and job_period.holds_ms(int(str(r["id"]).split("-")[0]))
    )
    assert stored["tasks"][TASK]["outcomes"] == dict(sorted(in_hour.items()))
    shown = run_cli(env, "report", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == stored
