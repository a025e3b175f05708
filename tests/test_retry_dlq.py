"""Retries follow the policy, failures end in the DLQ by class, and the DLQ round-trips.

Real worker processes against real Redis and the sandbox provider. Most tests share one
worker (module scoped): each uses its own keys and task ids, and resets the sandbox's
faults first. Tests that need other worker settings (retry budget, short visibility
timeout) start their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest
from celery import Celery

from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.idempotency import derive_key
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import ROOT, Environment, WorkerProcess, wait_until
from tests.support.tasks import BACKOFF_RETRY, FAST_RETRY, SLOW_RETRY
from worker.sandbox import SandboxProvider

# A distinctive secret: any occurrence outside the worker's environment is a leak.
SECRET = "sk_test_" + uuid.uuid4().hex


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def calls_for(provider: SandboxProvider, key: str) -> list[dict[str, Any]]:
    """Every raw call the sandbox received for one ``{"key": key}`` body, in arrival order."""
    return [r for r in provider.effects() if r["body"] == {"key": key}]


def outcomes(store: Store, task_id: str) -> list[str]:
    return Ledger(store).outcomes([task_id]).get(task_id, [])


def dead_letters(store: Store, task_id: str) -> list[DeadLetter]:
    return [e for e in DeadLetterQueue(store).iter() if e.task_id == task_id]


def failure_of(result: Any, timeout: float = 30) -> BaseException:
    """The exception ``AsyncResult.get()`` raises (the test fails if it returns)."""
    with pytest.raises(Exception) as failure:  # the type is asserted by name
        result.get(timeout=timeout)
    return failure.value


# -- one worker shared by the module ------------------------------------------------------


@pytest.fixture(scope="module")
def worker(shared_env: Environment) -> Iterator[WorkerProcess]:
    # The retry budget is exercised by its own test: here it must never refuse a retry.
    with WorkerProcess(
        shared_env,
        RELIABLE_PROVIDERS__PAYMENT_API_KEY=SECRET,
        RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND="1000",
    ) as process:
        yield process


# -- retry schedule and failure classes ---------------------------------------------------


def test_a_task_failing_twice_is_retried_on_the_policy_schedule_then_succeeds(
    provider: SandboxProvider, producer: Celery, shared_store: Store
) -> None:
    provider.set_faults(script=[503, 503, 200])
    key = unique("schedule")
    result = producer.send_task("test.backoff_call", args=[key])

    assert result.get(timeout=30)["status"] == "ok"
    calls = calls_for(provider, key)
    assert [c["status"] for c in calls] == [503, 503, 200]
    assert len({c["idempotency_key"] for c in calls}) == 1
    delays = BACKOFF_RETRY.schedule()[:2]
    assert delays == [0.5, 1.0]
    gaps = [b["arrived_at"] - a["arrived_at"] for a, b in pairwise(calls)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert delay <= gap < delay + 1.5, (gaps, delays)
    assert outcomes(shared_store, result.id) == ["retried", "retried", "succeeded"]


def test_a_task_out_of_attempts_is_dead_lettered_as_transient_with_its_envelope(
    provider: SandboxProvider, producer: Celery, shared_store: Store
) -> None:
    provider.set_faults(outage=True)
    key, correlation_id = unique("exhausted"), unique("corr")
    result = producer.send_task("test.call", args=[key], headers={"correlation_id": correlation_id})

    assert type(failure_of(result)).__name__ == "TransientError"
    assert len(calls_for(provider, key)) == FAST_RETRY.max_attempts == 3
    assert outcomes(shared_store, result.id) == ["retried", "retried", "dead_lettered"]
    [entry] = dead_letters(shared_store, result.id)
    assert entry.failure_class == "transient"
    assert entry.attempts == FAST_RETRY.max_attempts
    assert entry.exception_type == "TransientError"
    assert entry.correlation_id == correlation_id
    assert entry.idempotency_key == derive_key("test.call", {"key": key}, key_args=("key",))
    assert entry.args == [key] and entry.task_name == "test.call"


def test_a_4xx_is_dead_lettered_as_permanent_after_one_call_without_retry(
    provider: SandboxProvider, producer: Celery, shared_store: Store
) -> None:
    provider.set_faults(script=[400])
    key = unique("permanent")
    result = producer.send_task("test.call", args=[key])

    assert type(failure_of(result)).__name__ == "PermanentError"
    assert [c["status"] for c in calls_for(provider, key)] == [400]
    assert outcomes(shared_store, result.id) == ["dead_lettered"]
    [entry] = dead_letters(shared_store, result.id)
    assert (entry.failure_class, entry.attempts, entry.exception_type) == (
        "permanent",
        1,
        "PermanentError",
    )


def test_a_payment_id_charged_again_with_another_amount_is_dead_lettered_as_conflict(
    provider: SandboxProvider, producer: Celery, shared_store: Store
) -> None:
    payment_id = unique("pay")
    first = producer.send_task(
        "payments.charge", kwargs={"payment_id": payment_id, "amount": 100, "currency": "EUR"}
    )
    assert first.get(timeout=30)["status"] == "charged"
    second = producer.send_task(
        "payments.charge", kwargs={"payment_id": payment_id, "amount": 200, "currency": "EUR"}
    )

    assert type(failure_of(second)).__name__ == "IdempotencyConflict"
    charges = provider.effects(endpoint="charges")
    assert [c["body"]["amount"] for c in charges if c["body"]["payment_id"] == payment_id] == [100]
    assert outcomes(shared_store, second.id) == ["dead_lettered"]
    [entry] = dead_letters(shared_store, second.id)
    assert entry.failure_class == "conflict"
    assert entry.idempotency_key == derive_key(
        "payments.charge", {"payment_id": payment_id}, key_args=("payment_id",)
    )
    assert entry.kwargs["amount"] == 200


# -- retry budget and deferral (their own workers) ----------------------------------------


def test_the_retry_budget_allows_the_first_retry_and_dead_letters_the_rest(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    sandbox.set_faults(outage=True)
    producer = environment.producer()
    keys = [unique("budget") for _ in range(2)]
    # A floor of 0.1 retries per second over the 10 s window: one retry per window.
    with WorkerProcess(
        environment,
        RELIABLE_RETRY__BUDGET_RATIO="0",
        RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND="0.1",
    ):
        results = [producer.send_task("test.call", args=[key]) for key in keys]
        for result in results:
            assert type(failure_of(result)).__name__ == "TransientError"

    # One retry in the whole window: 2 first attempts + 1 retried attempt reach the provider.
    assert sum(len(calls_for(sandbox, key)) for key in keys) == 3
    histories = sorted(outcomes(store, r.id) for r in results)
    assert histories == [["dead_lettered"], ["retried", "dead_lettered"]]
    entries = [e for r in results for e in dead_letters(store, r.id)]
    assert sorted(e.failure_class for e in entries) == ["retry_budget_exhausted"] * 2
    assert sorted(e.attempts for e in entries) == [1, 2]
    assert {e.exception_type for e in entries} == {"TransientError"}


def test_a_retry_delay_longer_than_the_visibility_timeout_runs_the_body_exactly_twice(
    environment: Environment, store: Store
) -> None:
    producer = environment.producer()
    key = unique("deferral")
    runs_key = f"{environment.prefix}:test:slow_flaky:{key}"
    visibility_timeout = 2
    assert SLOW_RETRY.base_delay > visibility_timeout
    with WorkerProcess(
        environment,
        RELIABLE_BROKER__VISIBILITY_TIMEOUT_SECONDS=str(visibility_timeout),
        RELIABLE_BROKER__UNACKED_RESTORE_INTERVAL_SECONDS="1",
        RELIABLE_WORKER__DEFAULT_TIME_LIMIT_SECONDS="1.5",
        RELIABLE_WORKER__DEFAULT_SOFT_TIME_LIMIT_SECONDS="1",
    ):
        result = producer.send_task("test.slow_flaky", args=[key, 1])
        assert result.get(timeout=30) == f"{key}:2"
        # Nothing is left unacked for kombu to restore after the visibility timeout.
        broker = store.client
        wait_until(
            lambda: broker.hlen(f"{environment.broker_prefix}unacked") == 0,
            10,
            message="no unacked message left in the broker",
        )

    runs = [float(t) for t in store.client.lrange(runs_key, 0, -1)]
    assert len(runs) == 2
    assert runs[1] - runs[0] >= SLOW_RETRY.base_delay
    rows = [r for r in Ledger(store).entries() if r["task_id"] == result.id]
    assert [(r["outcome"], r["attempt"]) for r in rows] == [("retried", "1"), ("succeeded", "2")]


# -- the DLQ CLI ---------------------------------------------------------------------------


def dlq_cli(env: Environment, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``reliable dlq ...`` as an operator runs it (a subprocess: settings are read at import)."""
    return subprocess.run(
        [sys.executable, "-m", "worker.dlq_cli", *args],
        cwd=ROOT,
        input=stdin,
        env=env.env(RELIABLE_DLQ__MAX_REDRIVES="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_dlq_cli_lists_shows_redrives_once_and_purges_after_confirmation(
    provider: SandboxProvider, producer: Celery, shared_env: Environment, shared_store: Store
) -> None:
    dlq = DeadLetterQueue(shared_store)
    good, bad = unique("redrive-ok"), unique("redrive-again")
    correlation_id = unique("corr")
    provider.set_faults(script=[400, 400])
    failed = {
        key: producer.send_task(
            "test.call",
            args=[key],
            headers={"correlation_id": correlation_id, "idempotency_key": f"idem-{key}"},
        )
        for key in (good, bad)
    }
    poison = producer.send_task(
        "payments.charge", kwargs={"payment_id": unique("pay"), "amount": -1, "currency": "EUR"}
    )
    for result in [*failed.values(), poison]:
        failure_of(result)
    [good_entry] = dead_letters(shared_store, failed[good].id)
    [bad_entry] = dead_letters(shared_store, failed[bad].id)
    [poison_entry] = dead_letters(shared_store, poison.id)

    listed = dlq_cli(shared_env, "list", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    assert {good_entry.id, bad_entry.id, poison_entry.id} <= set(listed.stdout.split())
    only_poison = dlq_cli(shared_env, "list", "--class", "poison", "--limit", "1000")
    rows = only_poison.stdout.splitlines()[:-1]
    assert poison_entry.id in only_poison.stdout and good_entry.id not in only_poison.stdout
    assert rows and all(" poison " in row for row in rows)

    shown = dlq_cli(shared_env, "show", good_entry.id)
    assert shown.returncode == 0, shown.stderr
    envelope = json.loads(shown.stdout)
    assert envelope["id"] == good_entry.id and envelope["failure_class"] == "permanent"
    assert envelope["correlation_id"] == correlation_id
    assert envelope["idempotency_key"] == f"test.call:idem-{good}"

    # The fault is gone: the redriven task succeeds with the same key and correlation id.
    redriven = dlq_cli(shared_env, "retry", good_entry.id)
    assert redriven.returncode == 0, redriven.stderr
    new_id = redriven.stdout.split()[-1]
    assert producer.AsyncResult(new_id).get(timeout=30)["status"] == "ok"
    assert dlq.get(good_entry.id) is None
    calls = calls_for(provider, good)
    assert [c["status"] for c in calls] == [400, 200]
    assert {(c["idempotency_key"], c["correlation_id"]) for c in calls} == {
        (f"test.call:idem-{good}", correlation_id)
    }

    # Redriven into the same fault: dead-lettered again, and the cap (1) refuses a second redrive.
    provider.set_faults(script=[400])
    again = dlq_cli(shared_env, "retry", bad_entry.id)
    assert again.returncode == 0, again.stderr
    again_id = again.stdout.split()[-1]
    failure_of(producer.AsyncResult(again_id))
    [refailed] = dead_letters(shared_store, again_id)
    assert (refailed.redrive_count, refailed.correlation_id) == (1, correlation_id)
    assert dlq.get(bad_entry.id) is None
    refused = dlq_cli(shared_env, "retry", refailed.id)
    assert refused.returncode == 1
    assert "max 1" in refused.stderr
    assert dlq.get(refailed.id) is not None
    assert len(calls_for(provider, bad)) == 2

    total = dlq.count()
    declined = dlq_cli(shared_env, "purge", stdin="no\n")
    assert "nothing deleted" in declined.stdout
    assert dlq.count() == total
    purged = dlq_cli(shared_env, "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert f"deleted {total}" in purged.stdout
    assert dlq.count() == 0


def test_a_redrive_whose_publish_fails_keeps_the_entry(bare_store: Store) -> None:
    dlq = DeadLetterQueue(bare_store)
    entry = DeadLetter(task_name="test.call", task_id=unique("task"), failure_class="transient")
    dlq.add(entry, Ledger(bare_store))

    class BrokenBroker:
        def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
            raise ConnectionError("broker unreachable")

    with pytest.raises(ConnectionError):
        dlq.redrive(entry.id, BrokenBroker())
    kept = dlq.get(entry.id)
    assert kept is not None and kept.redrive_count == 0


# -- secrets -------------------------------------------------------------------------------


def test_a_secret_in_an_error_and_an_argument_reaches_neither_the_log_nor_the_dlq(
    provider: SandboxProvider,
    producer: Celery,
    shared_env: Environment,
    shared_store: Store,
    worker: WorkerProcess,
) -> None:
    result = producer.send_task("test.leak_secret", args=[f"argument {SECRET}"])

    error = failure_of(result)
    assert type(error).__name__ == "TransientError"
    # The producer's view (the result backend) carries the masked error and traceback too.
    assert str(error) == "token *** rejected (argument ***)"
    meta = json.loads(
        shared_store.client.get(f"{shared_env.broker_prefix}celery-task-meta-{result.id}")
    )
    assert SECRET not in json.dumps(meta["result"]) + (meta["traceback"] or "")
    [entry] = dead_letters(shared_store, result.id)
    raw = shared_store.client.hget(shared_store.keys.dlq, entry.id)
    assert SECRET not in raw
    assert entry.exception_message == "token *** rejected (argument ***)"
    assert entry.args == ["argument ***"]
    wait_until(
        lambda: f"Task test.leak_secret[{result.id}] raised" in worker.log_text(),
        10,
        message="the worker logged the task's failure",
    )
    log = worker.log_text()
    assert SECRET not in log
    assert "token *** rejected" in log
