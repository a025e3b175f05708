"""Every charge sent twice, concurrently, reaches the provider exactly once.

Size: ``RELIABLE_TEST_SIZE`` charges (default 300; the issue's full size is 1,000).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import defaultdict
from typing import Any

import pytest

from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

SIZE = int(os.environ.get("RELIABLE_TEST_SIZE", "300"))


def overlapping_calls(effects: list[dict[str, Any]]) -> int:
    """How many calls started while another call with the same key was in flight."""
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in effects:
        by_key[e["idempotency_key"]].append((e["arrived_at"], e["finished_at"]))
    overlaps = 0
    for spans in by_key.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            overlaps += int(start < end)
    return overlaps


def send_twice_concurrently(environment: Environment, size: int) -> list[str]:
    producers = [environment.producer(), environment.producer()]
    ids: list[list[str]] = [[], []]

    def send(n: int) -> None:
        for i in range(size):
            result = producers[n].send_task(
                "payments.charge",
                kwargs={"payment_id": f"pay-{i}", "amount": 1000 + i, "currency": "EUR"},
                headers={"correlation_id": f"order-{i}"},
            )
            ids[n].append(result.id)

    threads = [threading.Thread(target=send, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids[0] + ids[1]


def run_duplicate_burst(
    environment: Environment, sandbox: SandboxProvider, store: Store, size: int, **worker_env: str
) -> None:
    sandbox.set_faults(latency_seconds=0.005)
    workers = [WorkerProcess(environment, concurrency=3, **worker_env) for _ in range(2)]
    for w in workers:
        w.start(wait=False)
    try:
        for w in workers:
            w.wait_ready()
        task_ids = send_twice_concurrently(environment, size)
        ledger = Ledger(store)
        wait_until(
            lambda: ledger.reconcile(task_ids).lost == 0,
            timeout=60 + size * 0.1,
            interval=0.5,
            message="every task settled in the ledger",
        )
    finally:
        for w in workers:
            w.stop()
    rec = ledger.reconcile(task_ids)
    effects = sandbox.effects(endpoint="charges")
    keys = [e["idempotency_key"] for e in effects]
    print(
        f"sent={2 * size} succeeded={rec.count('succeeded')} skipped={rec.count('skipped')} "
        f"raw_calls={len(effects)} distinct_keys={len(set(keys))} lost={rec.lost}"
    )
    assert rec.lost == 0
    assert len(effects) == size
    assert len(set(keys)) == size
    assert overlapping_calls(effects) == 0
    assert rec.count("succeeded") == size
    assert rec.count("skipped") == size
    assert all(e["outcome"] == "effect" for e in effects)


def test_each_charge_sent_twice_concurrently_is_charged_once(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    run_duplicate_burst(environment, sandbox, store, SIZE)


@pytest.mark.rabbitmq
def test_each_charge_sent_twice_is_charged_once_with_rabbitmq_as_broker(
    redis_url: str, rabbitmq_url: str, sandbox: SandboxProvider
) -> None:
    from tests.support.fleet import delete_prefix

    environment = Environment(redis_url=redis_url, sandbox_url=sandbox.url, broker_url=rabbitmq_url)
    try:
        run_duplicate_burst(
            environment, sandbox, Store(redis_url, environment.prefix), max(SIZE // 3, 50)
        )
    finally:
        delete_prefix(redis_url, environment.prefix)
        with environment.producer().connection_for_write() as conn:
            conn.default_channel.queue_delete(environment.queue)
