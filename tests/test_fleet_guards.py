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
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until

pytestmark = pytest.mark.fleet

SIZE = int(os.environ.get("RELIABLE_TEST_SIZE", "300"))
LIMIT_SPAN_SECONDS = max(2, min(10, SIZE * 10 // 300))  # the 10 s from size 300 on
FLOOD = 2 * SIZE  # the 10,000 at size 5,000
QUIET = max(20, min(100, SIZE // 3))  # the other tenant's 100 from size 300 on


# -- helpers ------------------------------------------------------------------------------

@contextmanager
def fleet(environment: Environment, **env: str) -> Iterator[list[WorkerProcess]]:
    """Two workers × two prefork children: four processes taking tasks at once."""
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
    rows = store.call("read admitted",
                      lambda c: c.lrange(f"{store.keys.prefix}:test:admitted", 0, -1))
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


# -- 1. a global limit is exact -----------------------------------------------------------

LIMITS = {
    "gcra": {"kind": "gcra", "rate": 50, "burst": 1},
    "sliding": {"kind": "sliding", "max_requests": 50, "window_seconds": 1},
}


@pytest.mark.parametrize("kind", sorted(LIMITS))
def test_a_global_limit_admits_at_most_fifty_calls_in_every_second_across_the_fleet(
        environment: Environment, store: Store, kind: str) -> None:
    total = 50 * LIMIT_SPAN_SECONDS
    limits = json.dumps({"test-limit": LIMITS[kind]})
    producer = environment.producer()
    with fleet(environment, RELIABLE_RATE_LIMITS=limits):
        sent_at = redis_time(store)
        results = [producer.send_task("test.limited", args=[f"k{i}"]) for i in range(total)]
        wait_until(lambda: len(admitted(store)) >= total, timeout=LIMIT_SPAN_SECONDS + 30,
                   interval=0.2, message=f"{total} limited tasks to run")
        values = [r.get(timeout=30) for r in results]
    runs = admitted(store)
    stamps = [s for s, _, _ in runs]
    most, where = busiest_window(stamps)
    span = stamps[-1] - sent_at
    allowed = 50 * span + (1 if kind == "gcra" else 50)  # calls the limit allows over the span
    print(f"\n[{kind}] {total} tasks, busiest 1 s window {most} admissions at "
          f"+{where - sent_at:.3f}s; span {span:.3f}s; utilisation {total / allowed:.3f}")
    assert len(values) == total
    assert sorted(k for _, k, _ in runs) == sorted(f"k{i}" for i in range(total))
    assert most <= 50
