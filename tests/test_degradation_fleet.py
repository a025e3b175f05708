"""Degradation levels with a real worker: exactly the tasks that declared a level change.

The health hash is written directly (as the health poll would) and the
``maintenance.degradation_evaluate`` job, run by the worker, turns it into the level
(a rule maps ``provider:payment`` unhealthy to SEVERE). At SEVERE: ``test.deg_defer``
is parked and re-checked, ``test.deg_skip`` ends unrun as ``skipped_degraded``,
``test.deg_fallback`` is served by its chain (the last good result marked stale, else a
default, else deferred), while ``test.call`` (nothing declared) and ``test.deg_other``
(CRITICAL only) run. Back at NORMAL every deferred delivery runs, once. Effects are
counted at the sandbox, outcomes in the ledger, level changes at the alert webhook.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

N = 3
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(scope="module")
def worker(shared_env: Environment, shared_sandbox: SandboxProvider) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        shared_env,
        RELIABLE_DEGRADATION__RECHECK_SECONDS="0.5",
        RELIABLE_DEGRADATION__RULES=json.dumps(
            [{"component": "provider:payment", "status": "unhealthy", "level": "SEVERE"}]
        ),
        RELIABLE_ALERTS__WEBHOOK_URL=f"{shared_sandbox.url}/webhooks/alerts",
    ) as process:
        yield process


def set_health(store: Store, status: str) -> None:
    result = {"status": status, "latency_ms": 2.0, "checked_at": time.time(), "error": None}
    store.client.hset(f"{store.keys.prefix}:health", "provider:payment", json.dumps(result))


def evaluate(producer: Celery, slot: int) -> dict[str, Any]:
    reply: dict[str, Any] = producer.send_task(
        "maintenance.degradation_evaluate", kwargs={"slot": slot}
    ).get(timeout=30)
    return reply


def task_effects(provider: SandboxProvider) -> Counter[str]:
    return Counter(
        e["body"]["key"] for e in provider.effects() if e["path"] == "/webhooks" and e["body"]
    )


def test_a_degraded_level_changes_exactly_the_tasks_that_declared_it(
    provider: SandboxProvider, producer: Celery, shared_store: Store, worker: WorkerProcess
) -> None:
    ledger = Ledger(shared_store)

    def send(task: str, key: str) -> Any:
        return producer.send_task(task, kwargs={"key": key})

    warm = send("test.deg_fallback", "warm").get(timeout=30)  # NORMAL: runs, cached

    set_health(shared_store, "unhealthy")
    assert evaluate(producer, 1) == {
        "ran": True,
        "slot": 1,
        "status": "ok",
        "level": "SEVERE",
        "computed": "SEVERE",
        "changed": True,
        "reason": "provider:payment unhealthy",
    }
    sent = {
        "defer": [send("test.deg_defer", f"d{i}") for i in range(N)],
        "skip": [send("test.deg_skip", f"s{i}") for i in range(N)],
        "run": [send("test.call", f"c{i}") for i in range(N)]
        + [send("test.deg_other", f"o{i}") for i in range(N)],
        "stale": [send("test.deg_fallback", "warm")],
        "default": [send("test.deg_fallback", "cold")],
        "exhausted": [send("test.deg_fallback", "none-1")],
    }
    for result in sent["skip"]:
        assert result.get(timeout=30) == {"skipped": "degraded", "level": "SEVERE"}
    for result in sent["run"]:
        assert result.get(timeout=30)["status"] == "ok"
    stale = sent["stale"][0].get(timeout=30)
    assert stale == {"value": warm, "stale": True, "cached_at": stale["cached_at"]}
    assert re.fullmatch(ISO, stale["cached_at"])
    assert sent["default"][0].get(timeout=30) == {"default": "cold"}

    parked = [r.id for r in sent["defer"] + sent["exhausted"]]

    def deferred_twice() -> bool:
        seen = ledger.outcomes(parked)
        return all(seen.get(t, []).count("deferred") >= 2 for t in parked)

    # Each parked delivery was re-checked at SEVERE and parked again; none ran.
    wait_until(deferred_twice, 30, message="every deferred delivery re-checked and deferred")
    assert task_effects(provider) == Counter(
        {"warm": 1, **{f"c{i}": 1 for i in range(N)}, **{f"o{i}": 1 for i in range(N)}}
    )

    set_health(shared_store, "healthy")
    assert evaluate(producer, 2)["level"] == "NORMAL"
    for result in sent["defer"] + sent["exhausted"]:
        assert result.get(timeout=30)["status"] == "ok"
    # A skipped key was never completed: sent again at NORMAL, it runs.
    assert send("test.deg_skip", "s0").get(timeout=30)["status"] == "ok"

    assert task_effects(provider) == Counter(
        {
            "warm": 1,
            "none-1": 1,
            "s0": 1,
            **{f"{p}{i}": 1 for p in ("c", "o", "d") for i in range(N)},
        }
    )
    outcomes = ledger.outcomes([r.id for rs in sent.values() for r in rs])
    finals = {t: [o for o in seen if o != "deferred"] for t, seen in outcomes.items()}
    expected = {
        "defer": ["succeeded"],
        "exhausted": ["succeeded"],
        "skip": ["skipped_degraded"],
        "run": ["succeeded"],
        "stale": ["fallback"],
        "default": ["fallback"],
    }
    for group, results in sent.items():
        for result in results:
            assert finals[result.id] == expected[group], (group, outcomes[result.id])
    # Two level changes, each alerted once at the webhook.
    alerts = [e["body"] for e in provider.effects() if e["path"] == "/webhooks/alerts"]
    assert [(a["event"], a["from"], a["to"]) for a in alerts] == [
        ("degradation_level_changed", "NORMAL", "SEVERE"),
        ("degradation_level_changed", "SEVERE", "NORMAL"),
    ]
