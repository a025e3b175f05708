"""Breakers and rate limits the whole fleet obeys as one client, with real workers.

Every test runs two prefork workers of two pool processes each (four processes that
take tasks at once), sends work from a plain Celery producer, and counts effects: raw
sandbox calls, admissions stamped with Redis ``TIME`` by ``test.limited``, ledger
entries and breaker transition events.

Size: ``RELIABLE_TEST_SIZE`` (default 300) scales the runs. At the default the global
limit runs for the issue's full 10 s (500 tasks at 50/s) and a tenant floods 600 tasks;
``RELIABLE_TEST_SIZE=5000`` floods the issue's 10,000.
"""

from __future__ import annotations

import bisect
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest
from celery import Celery

from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

pytestmark = pytest.mark.fleet

SIZE = int(os.environ.get("RELIABLE_TEST_SIZE", "300"))
LIMIT_SPAN_SECONDS = max(2, min(10, SIZE * 10 // 300))  # the 10 s from size 300 on
FLOOD = 2 * SIZE  # the 10,000 at size 5,000
QUIET = max(20, min(100, SIZE // 3))  # the other tenant's 100 from size 300 on
BREAKER = "test-breaker"
GUARDED = "test.guarded_call"


# -- helpers ------------------------------------------------------------------------------


@contextmanager
def fleet(environment: Environment, **env: str) -> Iterator[list[WorkerProcess]]:
    """Two workers of two prefork children each: four processes taking tasks at once."""
    workers = [WorkerProcess(environment, concurrency=2, **env) for _ in range(2)]
    try:
        for worker in workers:
            worker.start(wait=False)
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def admitted(store: Store) -> list[tuple[float, str, str]]:
    """(Redis TIME stamp, key, tenant) of every ``test.limited`` run, by stamp."""
    rows = store.call(
        "read admitted", lambda c: c.lrange(f"{store.keys.prefix}:test:admitted", 0, -1)
    )
    stamps = []
    for row in rows:
        stamp, key, tenant = row.split(":", 2)
        stamps.append((float(stamp), key, tenant))
    return sorted(stamps)


def busiest_window(stamps: list[float], width: float = 1.0) -> tuple[int, float]:
    """The most stamps in any half-open window [t, t + width), and where it starts.

    Sliding, not aligned: every window starting at a stamp is checked, which covers
    every window (one that starts between stamps holds no more than one starting at the
    next stamp).
    """
    ordered = sorted(stamps)
    best, at = 0, ordered[0] if ordered else 0.0
    for i, start in enumerate(ordered):
        count = bisect.bisect_left(ordered, start + width) - i
        if count > best:
            best, at = count, start
    return best, at


def redis_time(store: Store) -> float:
    seconds, micros = store.call("time", lambda c: c.time())
    return seconds + micros / 1_000_000


def breaker_settings(**config: Any) -> str:
    return json.dumps({BREAKER: config})


def breaker_state(store: Store) -> str:
    """The stored state, read without applying time-based transitions (no side effect)."""
    key = f"{store.keys.prefix}:{{{BREAKER}}}:cb"
    return store.call("breaker state", lambda c: c.hget(key, "state")) or "closed"


def transitions(store: Store) -> list[dict[str, str]]:
    rows = store.call("events", lambda c: c.xrange(f"{store.keys.prefix}:cb:events"))
    return [fields for _, fields in rows if fields.get("breaker") == BREAKER]


def ledger(store: Store) -> dict[str, list[dict[str, str]]]:
    """Ledger entries by task id, in order."""
    by_task: dict[str, list[dict[str, str]]] = {}
    for row in Ledger(store).entries():
        by_task.setdefault(row["task_id"], []).append(row)
    return by_task


def deferred_by_open_breaker(store: Store, task_ids: list[str]) -> bool:
    rows = ledger(store)
    return all(
        any(r["outcome"] == "deferred" and r["detail"] == "breaker_open" for r in rows.get(tid, []))
        for tid in task_ids
    )


def trial_slot(store: Store) -> tuple[str, float] | None:
    """The one half-open trial lease held now: (owner, expiry on Redis time)."""
    key = f"{store.keys.prefix}:{{{BREAKER}}}:cb:trials"
    rows = store.call("trials", lambda c: c.zrange(key, 0, -1, withscores=True))
    return (rows[0][0], rows[0][1]) if len(rows) == 1 else None


def running_child(
    workers: list[WorkerProcess], producer: Celery, task_name: str
) -> tuple[str, psutil.Process]:
    """(task id, pool child) of the one ``task_name`` delivery running now (inspect)."""
    children = {p.pid: p for w in workers for p in w.children()}

    def find() -> tuple[str, psutil.Process] | None:
        inspector = producer.control.inspect(timeout=1.0)
        running = [
            task
            for tasks in (inspector.active() or {}).values()
            for task in tasks
            if task["name"] == task_name and task.get("worker_pid") in children
        ]
        if len(running) != 1:
            return None
        return running[0]["id"], children[running[0]["worker_pid"]]

    return wait_until(find, timeout=20, interval=0.1, message=f"the one {task_name} running")


def concurrent(calls: list[dict[str, Any]]) -> bool:
    """Every call arrived before any of them finished: they were all in flight at once."""
    return max(c["arrived_at"] for c in calls) < min(c["finished_at"] for c in calls)


# -- 1. a global limit is exact -----------------------------------------------------------

LIMITS = {
    "gcra": {"kind": "gcra", "rate": 50, "burst": 1},
    "sliding": {"kind": "sliding", "max_requests": 50, "window_seconds": 1},
}


@pytest.mark.parametrize("kind", sorted(LIMITS))
def test_a_global_limit_admits_at_most_fifty_calls_in_every_second_across_the_fleet(
    environment: Environment, store: Store, kind: str
) -> None:
    total = 50 * LIMIT_SPAN_SECONDS
    limits = json.dumps({"test-limit": LIMITS[kind]})
    producer = environment.producer()
    with fleet(environment, RELIABLE_RATE_LIMITS=limits):
        sent_at = redis_time(store)
        results = [producer.send_task("test.limited", args=[f"k{i}"]) for i in range(total)]
        wait_until(
            lambda: len(admitted(store)) >= total,
            timeout=LIMIT_SPAN_SECONDS + 30,
            interval=0.2,
            message=f"{total} limited tasks to run",
        )
        values = [r.get(timeout=30) for r in results]
    runs = admitted(store)
    stamps = [s for s, _, _ in runs]
    most, where = busiest_window(stamps)
    span = stamps[-1] - sent_at
    # Calls the limit allows from the first send to the last run (a closed interval).
    allowed = int(span * 50) + 1 if kind == "gcra" else 50 * (int(span) + 1)
    per_second = [sum(int(s - sent_at) == i for s in stamps) for i in range(int(span) + 1)]
    later, _ = busiest_window([s for s in stamps if s - sent_at >= span / 2])
    print(
        f"\n[{kind}] {total} tasks, busiest 1 s window {most} admissions at "
        f"+{where - sent_at:.3f}s (second half of the run: {later}); span {span:.3f}s; "
        f"utilisation {total / allowed:.3f}; per aligned second {per_second}"
    )
    assert len(values) == total
    assert sorted(k for _, k, _ in runs) == sorted(f"k{i}" for i in range(total))
    assert most <= 50


# -- 2. one breaker for the whole fleet ---------------------------------------------------


def test_failures_from_four_processes_open_one_breaker_after_the_threshold(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    threshold, later = 4, 12
    producer = environment.producer()
    # Slow failures, so the four calls are in flight together: four pool processes.
    sandbox.set_faults(outage=True, latency_seconds=0.3)
    settings = breaker_settings(
        failure_threshold=threshold,
        recovery_timeout_seconds=60,
        half_open_max_calls=1,
        success_threshold=1,
    )
    with fleet(environment, RELIABLE_BREAKERS=settings):
        failing = [producer.send_task(GUARDED, args=[f"f{i}"]) for i in range(threshold)]
        wait_until(lambda: breaker_state(store) == "open", timeout=20, message="breaker open")
        waiting = [producer.send_task(GUARDED, args=[f"w{i}"]) for i in range(later)]
        ids = [r.id for r in failing + waiting]
        # Every delivery since the opening is parked: the failed tasks' retries and the rest.
        wait_until(
            lambda: deferred_by_open_breaker(store, ids),
            timeout=20,
            message="every task parked by the open breaker",
        )
        calls = sandbox.effects(endpoint="webhooks")
        events = transitions(store)
        rows = ledger(store)
    print(
        f"\n{len(calls)} sandbox calls (threshold {threshold}), {len(ids)} tasks parked, "
        f"transitions {[e['to'] for e in events]}"
    )
    assert len(calls) == threshold
    assert all(c["outcome"] == "outage" for c in calls)
    assert len({c["idempotency_key"] for c in calls}) == threshold
    assert concurrent(calls)  # one failure from each of four processes
    assert [(e["from"], e["to"], e["reason"]) for e in events] == [
        ("closed", "open", f"{threshold} consecutive failures")
    ]
    for result in failing:
        assert [r["outcome"] for r in rows[result.id]] == ["retried", "deferred"]
    for result in waiting:
        assert [r["outcome"] for r in rows[result.id]] == ["deferred"]


# -- 3. half-open: exactly N trial calls fleet-wide ----------------------------------------


def test_a_half_open_breaker_admits_exactly_its_trial_calls_fleet_wide_then_lets_all_through(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    trials, parked = 3, 12
    producer = environment.producer()
    sandbox.set_faults(outage=True)
    settings = breaker_settings(
        failure_threshold=2,
        recovery_timeout_seconds=2,
        half_open_max_calls=trials,
        success_threshold=trials,
        trial_lease_seconds=30,
    )
    with fleet(environment, RELIABLE_BREAKERS=settings):
        opening = [producer.send_task(GUARDED, args=[f"f{i}"]) for i in range(2)]
        wait_until(lambda: breaker_state(store) == "open", timeout=20, message="breaker open")
        waiting = [producer.send_task(GUARDED, args=[f"w{i}"]) for i in range(parked)]
        wait_until(
            lambda: deferred_by_open_breaker(store, [r.id for r in waiting]),
            timeout=20,
            message="tasks parked by the open breaker",
        )
        # The provider recovers, slowly: trial calls stay in flight together for a second.
        sandbox.set_faults(outage=False, latency_seconds=1.0)
        values = [r.get(timeout=60) for r in opening + waiting]
        calls = sandbox.effects(endpoint="webhooks")
        events = transitions(store)
        rows = ledger(store)
    closed_at = float(next(e["at"] for e in events if e["to"] == "closed"))
    succeeded = [c for c in calls if c["outcome"] == "effect"]
    trial_calls = [c for c in succeeded if c["arrived_at"] < closed_at]
    busy = sum(r["detail"] == "breaker_busy" for rs in rows.values() for r in rs)
    print(
        f"\n{len(trial_calls)} calls while half-open (max {trials}), {busy} deliveries "
        f"refused as busy meanwhile, {len(succeeded)} successful calls in all"
    )
    assert len(values) == 2 + parked
    assert [e["to"] for e in events] == ["open", "half_open", "closed"]
    assert len(trial_calls) == trials
    assert concurrent(trial_calls)
    assert busy > 0  # a fourth process wanted to call and was held back
    assert len(succeeded) == 2 + parked
    assert len({c["idempotency_key"] for c in succeeded}) == 2 + parked


def test_a_killed_trial_frees_its_slot_at_once(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    lease, parked = 3, 4
    producer = environment.producer()
    sandbox.set_faults(outage=True)
    settings = breaker_settings(
        failure_threshold=2,
        recovery_timeout_seconds=1,
        half_open_max_calls=1,
        success_threshold=1,
        trial_lease_seconds=lease,
    )
    with fleet(environment, RELIABLE_BREAKERS=settings) as workers:
        opening = [producer.send_task(GUARDED, args=[f"f{i}"]) for i in range(2)]
        wait_until(lambda: breaker_state(store) == "open", timeout=20, message="breaker open")
        waiting = [producer.send_task(GUARDED, args=[f"w{i}"]) for i in range(parked)]
        # The first trial hangs in the provider long enough to be found and killed.
        sandbox.set_faults(outage=False, latency_seconds=5.0)
        _owner, expires = wait_until(
            lambda: trial_slot(store), timeout=20, message="a half-open trial"
        )
        trial_id, child = running_child(workers, producer, GUARDED)
        sandbox.set_faults(latency_seconds=0.0)
        child.send_signal(signal.SIGKILL)
        killed_at = redis_time(store)
        values = [r.get(timeout=60) for r in opening + waiting]
        # The killed trial's call finishes in the provider after its latency.
        wait_until(
            lambda: len(sandbox.effects(endpoint="webhooks")) == 2 + 1 + 2 + parked,
            timeout=20,
            message="the killed trial's call recorded",
        )
        calls = sandbox.effects(endpoint="webhooks")
        events = transitions(store)
        rows = ledger(store)
    half_open_at = float(next(e["at"] for e in events if e["to"] == "half_open"))
    closed_at = float(next(e["at"] for e in events if e["to"] == "closed"))
    trial_calls = sorted(
        (c for c in calls if half_open_at <= c["arrived_at"] < closed_at),
        key=lambda c: c["arrived_at"],
    )
    print(
        f"\ntrial killed {killed_at - half_open_at:.3f}s after half-open (its lease would "
        f"lapse at +{expires - half_open_at:.3f}s), next trial at "
        f"+{trial_calls[-1]['arrived_at'] - half_open_at:.3f}s, closed at "
        f"+{closed_at - half_open_at:.3f}s"
    )
    assert len(values) == 2 + parked
    assert "requeued" in [r["outcome"] for r in rows[trial_id]]
    # Exactly two trials: the killed one, then one more after the kill. The worker's parent
    # frees the dead child's slot as soon as it notices the death (Celery may take up to
    # its 5 s pool tick); at the latest, the slot's lease lapses.
    assert len(trial_calls) == 2
    assert killed_at <= trial_calls[1]["arrived_at"] < expires + 1.0
    # The killed trial counted neither way: no re-open, one close by the next trial.
    assert [e["to"] for e in events] == ["open", "half_open", "closed"]


# -- 4. deferral by an open breaker spends no attempt --------------------------------------


def test_tasks_an_open_breaker_deferred_run_later_on_their_first_attempt(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    parked = 8
    producer = environment.producer()
    sandbox.set_faults(outage=True)
    settings = breaker_settings(
        failure_threshold=2, recovery_timeout_seconds=1, half_open_max_calls=2, success_threshold=1
    )
    with fleet(environment, RELIABLE_BREAKERS=settings):
        opening = [producer.send_task(GUARDED, args=[f"f{i}"]) for i in range(2)]
        wait_until(lambda: breaker_state(store) == "open", timeout=20, message="breaker open")
        waiting = [producer.send_task(GUARDED, args=[f"w{i}"]) for i in range(parked)]
        wait_until(
            lambda: deferred_by_open_breaker(store, [r.id for r in waiting]),
            timeout=20,
            message="tasks parked by the open breaker",
        )
        sandbox.set_faults(outage=False)
        values = [r.get(timeout=60) for r in opening + waiting]
        rows = ledger(store)
    deferrals = sum(r["outcome"] == "deferred" for w in waiting for r in rows[w.id])
    print(f"\n{parked} tasks deferred {deferrals} times in all, each ran on attempt 1")
    assert len(values) == 2 + parked
    for result in waiting:
        entries = rows[result.id]
        assert [r["outcome"] for r in entries[:-1]] == ["deferred"] * (len(entries) - 1)
        assert {r["detail"] for r in entries[:-1]} <= {"breaker_open", "breaker_busy"}
        assert (entries[-1]["outcome"], entries[-1]["attempt"]) == ("succeeded", "1")
        assert all(r["attempt"] == "1" for r in entries)
    for result in opening:  # the one real failure is the only attempt they spent
        outcomes = [r["outcome"] for r in rows[result.id]]
        assert outcomes[0] == "retried" and outcomes.count("retried") == 1
        assert (outcomes[-1], rows[result.id][-1]["attempt"]) == ("succeeded", "2")


# -- 5. tenants -------------------------------------------------------------------------


def test_a_tenant_flooding_the_queue_leaves_another_tenants_tasks_on_their_own_schedule(
    environment: Environment, store: Store
) -> None:
    rate = 20
    limits = json.dumps({"test-limit": {"kind": "gcra", "rate": rate, "burst": 1, "per": "tenant"}})
    producer = environment.producer()

    def send(tenant: str, count: int) -> None:
        for i in range(count):
            producer.send_task(
                "test.limited", args=[f"{tenant}{i}", tenant], headers={"tenant_id": tenant}
            )

    def runs(tenant: str) -> list[float]:
        return [s for s, _, t in admitted(store) if t == tenant]

    with fleet(environment, RELIABLE_RATE_LIMITS=limits):
        send("flooder", FLOOD)
        started = redis_time(store)
        send("quiet", QUIET)
        wait_until(
            lambda: len(runs("quiet")) >= QUIET,
            timeout=QUIET / rate + 60 + FLOOD / 100,
            interval=0.2,
            message=f"the quiet tenant's {QUIET} tasks",
        )
        quiet, flooder = runs("quiet"), runs("flooder")
    schedule = (QUIET - 1) / rate
    finished = max(quiet) - started
    print(
        f"\nflooder sent {FLOOD}, {len(flooder)} ran meanwhile; quiet tenant's {QUIET} "
        f"tasks done {finished:.3f}s after sending (own schedule {schedule:.2f}s + 5s); "
        f"busiest second: quiet {busiest_window(quiet)[0]}, flooder "
        f"{busiest_window(flooder)[0]}"
    )
    assert len(quiet) == QUIET
    assert finished <= schedule + 5


def test_a_slow_trial_keeps_its_slot_beyond_the_trial_lease(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    parked = 4
    producer = environment.producer()
    sandbox.set_faults(outage=True)
    settings = breaker_settings(
        failure_threshold=2,
        recovery_timeout_seconds=1,
        half_open_max_calls=1,
        success_threshold=1,
        trial_lease_seconds=1,
    )
    with fleet(environment, RELIABLE_BREAKERS=settings):
        opening = [producer.send_task(GUARDED, args=[f"f{i}"]) for i in range(2)]
        wait_until(lambda: breaker_state(store) == "open", timeout=20, message="breaker open")
        waiting = [producer.send_task(GUARDED, args=[f"w{i}"]) for i in range(parked)]
        # The trial call takes three trial leases: its running body keeps the slot renewed.
        sandbox.set_faults(outage=False, latency_by_endpoint={"webhooks": 3.0})
        wait_until(
            lambda: breaker_state(store) == "closed",
            timeout=30,
            message="the slow trial closed the breaker",
        )
        sandbox.set_faults(latency_by_endpoint={})
        values = [r.get(timeout=60) for r in opening + waiting]
        calls = sandbox.effects(endpoint="webhooks")
        events = transitions(store)
    half_open_at = float(next(e["at"] for e in events if e["to"] == "half_open"))
    closed_at = float(next(e["at"] for e in events if e["to"] == "closed"))
    trial_calls = [c for c in calls if half_open_at <= c["arrived_at"] < closed_at]
    print(
        f"\n{len(trial_calls)} call(s) while half-open for {closed_at - half_open_at:.2f}s "
        "with a 1 s trial lease"
    )
    assert len(values) == 2 + parked
    assert len(trial_calls) == 1
    assert closed_at - half_open_at >= 3.0
    assert [e["to"] for e in events] == ["open", "half_open", "closed"]
