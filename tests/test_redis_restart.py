"""A worker rides out Redis restarts: no exit, nothing lost, nothing run twice.

Redis (broker, result backend and state store, AOF ``appendfsync always``) is killed
and started again five times while a prefork worker works through a batch of charges.
The worker must keep its process id (no supervisor restarts it here), resume
consuming within 10 s of Redis returning, lose nothing and make one provider effect
per charge: running bodies are not killed on a broker blip, their acks go through the
new connection, and their messages are not restored while they still run.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from tests.support.redis_server import RedisServer
from worker.sandbox import SandboxProvider

SIZE = int(os.environ.get("RELIABLE_TEST_SIZE", "300"))
RESTARTS = 5


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def test_five_redis_restarts_during_a_run_lose_nothing_and_run_nothing_twice(
    own_redis: RedisServer, sandbox: SandboxProvider
) -> None:
    environment = Environment(redis_url=own_redis.url, sandbox_url=sandbox.url)
    sandbox.set_faults(latency_seconds=0.01)
    size = max(SIZE, 200)
    worker = WorkerProcess(
        environment, concurrency=2, RELIABLE_REDIS__SOCKET_TIMEOUT_SECONDS="1"
    ).start()
    pid = worker.pid
    producer = environment.producer()
    ids = [
        producer.send_task(
            "payments.charge", kwargs={"payment_id": f"r{i}", "amount": 10, "currency": "EUR"}
        ).id
        for i in range(size)
    ]
    ledger = Ledger(Store(own_redis.url, environment.prefix))
    resumed: list[float] = []

    def made() -> int:
        return sum(1 for e in sandbox.effects() if e["outcome"] == "effect")

    try:
        for n in range(1, RESTARTS + 1):
            wait_until(
                lambda n=n: made() >= size * n // (RESTARTS + 2),
                timeout=120,
                message=f"charges before restart {n}",
            )
            own_redis.crash()
            own_redis.start()
            back, before = time.monotonic(), made()
            wait_until(
                lambda before=before: made() > before,
                timeout=10,
                interval=0.05,
                message=f"consumption resumed after restart {n}",
            )
            resumed.append(time.monotonic() - back)
            assert worker.proc is not None and worker.proc.poll() is None, worker.log_text()[-3000:]
        wait_until(
            lambda: ledger.reconcile(ids).lost == 0,
            timeout=180,
            interval=0.5,
            message="every charge settled after the restarts",
        )
    finally:
        alive = worker.proc is not None and worker.proc.poll() is None
        worker.stop()
    rec = ledger.reconcile(ids)
    effects = Counter(e["idempotency_key"] for e in sandbox.effects() if e["outcome"] == "effect")
    print(
        f"sent={size} restarts={RESTARTS} succeeded={rec.count('succeeded')} "
        f"skipped={rec.count('skipped')} lost={rec.lost} effects={sum(effects.values())} "
        f"duplicates={sum(n - 1 for n in effects.values())} "
        f"resumed_after={[round(x, 2) for x in resumed]}"
    )
    assert alive and worker.pid == pid
    assert "Unrecoverable error" not in worker.log_text()
    assert rec.lost == 0
    assert rec.count("succeeded") + rec.count("skipped") == size
    assert len(effects) == size
    assert all(n == 1 for n in effects.values())
