"""An expired message met while the state store is down is requeued, not acked unwritten
and not a crashed consumer: the worker's parent waits briefly for the store, hands the
message back, and dead-letters it as expired once the store returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from tests.support.redis_server import RedisServer
from worker.sandbox import SandboxProvider


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def test_an_expired_message_met_while_the_store_is_down_is_requeued_and_dead_lettered_later(
    redis_url: str, own_redis: RedisServer, sandbox: SandboxProvider
) -> None:
    environment = Environment(redis_url=own_redis.url, sandbox_url=sandbox.url)
    producer_env = Environment(redis_url=redis_url, sandbox_url=sandbox.url, name=environment.name)
    worker = WorkerProcess(
        environment,
        RELIABLE_BROKER__URL=redis_url,
        RELIABLE_BROKER__RESULT_BACKEND_URL=redis_url,
        RELIABLE_REDIS__UNAVAILABLE_WAIT_SECONDS="1",
        RELIABLE_REDIS__SOCKET_TIMEOUT_SECONDS="0.5",
    ).start()
    try:
        producer = producer_env.producer()
        own_redis.crash()
        sent = producer.send_task(
            "test.echo", args=["late"], expires=datetime.now(UTC) - timedelta(minutes=1)
        )
        wait_until(
            lambda: "state_store_unavailable" in worker.log_text(),
            timeout=30,
            message="the expired message tried the store",
        )
        wait_until(
            lambda: (
                "task_ending_unrecorded_requeued" in worker.log_text()
                or (worker.proc is not None and worker.proc.poll() is not None)
            ),
            timeout=30,
            message="the revoke path gave up on the store",
        )
        crashed = [
            line[:160] for line in worker.log_text().splitlines() if "Unrecoverable error" in line
        ]
        assert not crashed, f"the worker died instead of requeueing: {crashed}"
        assert "task_ending_unrecorded_requeued" in worker.log_text()
        own_redis.start()
        store = Store(own_redis.url, environment.prefix)
        # The requeued message comes back and is dead-lettered as expired.
        wait_until(
            lambda: Ledger(store).outcomes([sent.id]).get(sent.id),
            timeout=60,
            message="the expired message reaches the ledger",
        )
        entries = DeadLetterQueue(store).page()
    finally:
        worker.stop()
    assert [e.failure_class for e in entries] == ["expired"]
