"""When Redis is away nothing runs whose outcome cannot be recorded, and nothing is lost."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from reliability.idempotency import derive_key
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from tests.support.redis_server import RedisServer
from worker.sandbox import SandboxProvider

SIZE = int(os.environ.get("RELIABLE_TEST_SIZE", "300"))


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def test_tasks_wait_while_the_state_store_is_down_and_complete_when_it_returns(
    redis_url: str, own_redis: RedisServer, sandbox: SandboxProvider
) -> None:
    # Broker and result backend on the shared Redis; the state store is our own server.
    environment = Environment(redis_url=own_redis.url, sandbox_url=sandbox.url)
    producer_env = Environment(redis_url=redis_url, sandbox_url=sandbox.url, name=environment.name)
    worker = WorkerProcess(
        environment,
        RELIABLE_BROKER__URL=redis_url,
        RELIABLE_BROKER__RESULT_BACKEND_URL=redis_url,
        RELIABLE_REDIS__UNAVAILABLE_WAIT_SECONDS="60",
        RELIABLE_REDIS__SOCKET_TIMEOUT_SECONDS="0.5",
    ).start()
    try:
        producer = producer_env.producer()
        first = producer.send_task("test.call", kwargs={"key": "before"})
        assert first.get(timeout=30)["status"] == "ok"
        own_redis.crash()
        results = [producer.send_task("test.call", kwargs={"key": f"during-{i}"}) for i in range(5)]
        wait_until(
            lambda: worker.log_text().count("state_store_unavailable") >= 2,
            timeout=30,
            message="tasks waiting on the store",
        )
        assert len(sandbox.effects()) == 1  # nothing ran while the store was away
        own_redis.start()
        values = [r.get(timeout=60) for r in results]
    finally:
        worker.stop()
    assert [v["status"] for v in values] == ["ok"] * 5
    effects = sandbox.effects()
    assert sorted(e["idempotency_key"] for e in effects) == sorted(
        derive_key("test.call", {"key": k}, key_args=("key",))
        for k in ["before", *(f"during-{i}" for i in range(5))]
    )
    rec = Ledger(Store(own_redis.url, environment.prefix)).reconcile(
        [first.id, *(r.id for r in results)]
    )
    assert rec.lost == 0 and rec.count("succeeded") == 6


def test_a_redis_crash_with_aof_always_loses_no_task(
    own_redis: RedisServer, sandbox: SandboxProvider
) -> None:
    environment = Environment(redis_url=own_redis.url, sandbox_url=sandbox.url)
    sandbox.set_faults(latency_seconds=0.01)
    size = max(SIZE // 2, 50)
    # Celery's worker may exit on a lost broker connection (celery#9250); like a container
    # runtime, the test restarts it. Messages wait in Redis meanwhile.
    worker = (
        WorkerProcess(environment, concurrency=3, RELIABLE_REDIS__SOCKET_TIMEOUT_SECONDS="1")
        .start()
        .supervise()
    )
    producer = environment.producer()
    ids = [
        producer.send_task(
            "payments.charge", kwargs={"payment_id": f"c{i}", "amount": 10, "currency": "EUR"}
        ).id
        for i in range(size)
    ]
    store = Store(own_redis.url, environment.prefix)
    ledger = Ledger(store)
    try:
        wait_until(
            lambda: len(sandbox.effects()) >= size // 4,
            timeout=60,
            message="a quarter of the charges made",
        )
        own_redis.crash()
        own_redis.start()
        wait_until(
            lambda: ledger.reconcile(ids).lost == 0,
            timeout=120,
            interval=0.5,
            message="every charge settled after the crash",
        )
    finally:
        worker.stop()
    rec = ledger.reconcile(ids)
    effects = [e for e in sandbox.effects() if e["outcome"] == "effect"]
    keys = [e["idempotency_key"] for e in effects]
    print(
        f"sent={size} succeeded={rec.count('succeeded')} skipped={rec.count('skipped')} "
        f"dead={rec.count('dead_lettered')} "
        f"effects={len(effects)} distinct={len(set(keys))} lost={rec.lost} "
        f"worker_restarts={worker.restarts}"
    )
    assert rec.lost == 0
    assert rec.count("succeeded") + rec.count("skipped") == size
    assert len(set(keys)) == size
    # A charge whose completion the crash swallowed runs again: same key, newer fence, so a
    # provider that honours keys sees one effect (the README's "exactly once" caveat).
    fences: dict[str, list[int]] = {}
    for e in effects:
        fences.setdefault(e["idempotency_key"], []).append(e["fencing_token"])
    assert all(f == sorted(set(f)) for f in fences.values())
