"""The hard time limit kills a stuck pool child, and its ending is settled.

A body that holds the GIL in a C call with every signal but SIGKILL blocked, or one
that sleeps through its soft time limit, is killed at its hard limit under prefork; the
delivery is retried (or dead-lettered once its attempts are spent) exactly as the
hard-limit path settles it, the worker's main process stays the same and keeps
consuming. A soft limit set above the hard one no longer postpones the kill (Celery's
prefork pool arms the hard timer only when the soft one fires), and a hard limit met
while the state store is down hands the message back instead of acking it unrecorded.

Run with ``-s`` to see the measured times (printed, never asserted).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery

from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, delete_prefix, wait_until
from tests.support.redis_server import RedisServer
from worker.sandbox import SandboxProvider

HARD_LIMIT = 2  # seconds, per message
SOFT_LIMIT = 1
STUCK_SECONDS = 120  # far beyond every limit: only a kill ends it
WAIT = 30.0
# Long leases: a stuck body cannot renew its own (issue 6, item 3); keep the reaper out.
LEASE_TTL = "60"


@dataclass
class Fleet:
    environment: Environment
    worker: WorkerProcess
    sandbox: SandboxProvider
    store: Store
    producer: Celery

    def effects(self, key: str) -> int:
        return sum(
            1
            for c in self.sandbox.effects(endpoint="webhooks")
            if (c["body"] or {}).get("key") == key
        )

    def starts(self, key: str) -> int:
        return int(self.store.client.get(f"{self.environment.prefix}:test:stuck:{key}") or 0)

    def outcomes(self, task_id: str) -> list[str]:
        return Ledger(self.store).outcomes([task_id]).get(task_id, [])

    def send(self, key: str, **kwargs: Any) -> Any:
        options = {"time_limit": HARD_LIMIT, "soft_time_limit": SOFT_LIMIT}
        options.update(kwargs.pop("options", {}))
        return self.producer.send_task(
            "test.stuck_call", kwargs={"key": key, "seconds": STUCK_SECONDS, **kwargs}, **options
        )

    def assert_still_consuming(self, main_pid: int) -> None:
        assert self.worker.proc is not None and self.worker.proc.poll() is None
        assert self.worker.pid == main_pid
        assert self.producer.send_task("test.echo", args=["alive"]).get(timeout=WAIT) == "alive"


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[Fleet]:
    with SandboxProvider().start() as sandbox:
        environment = Environment(redis_url=redis_url, sandbox_url=sandbox.url)
        worker = WorkerProcess(
            environment,
            concurrency=2,
            RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS=LEASE_TTL,
            RELIABLE_BROKER__MAX_MESSAGE_BYTES=str(8 * 1024 * 1024),
        )
        try:
            with worker:
                yield Fleet(
                    environment,
                    worker,
                    sandbox,
                    Store(redis_url, environment.prefix),
                    environment.producer(),
                )
        finally:
            delete_prefix(redis_url, environment.prefix)


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("mode", ["gil", "stubborn"])
def test_a_stuck_body_is_killed_at_its_hard_limit_retried_and_runs_once(
    fleet: Fleet, mode: str
) -> None:
    main_pid = fleet.worker.pid
    key = unique(mode)
    sent_at = time.monotonic()
    sent = fleet.send(key, mode=mode, times=1)

    sent.get(timeout=WAIT)  # raises unless the second attempt succeeded
    retried_after = time.monotonic() - sent_at
    print(
        f"\n{mode}: hard limit {HARD_LIMIT} s -> killed, retried and done after "
        f"{retried_after:.2f} s"
    )

    assert fleet.outcomes(sent.id) == ["retried", "succeeded"]
    assert fleet.starts(key) == 2
    assert fleet.effects(key) == 1
    killed = [
        line
        for line in fleet.worker.log_text().splitlines()
        if "task_hard_time_limit_child_killed" in line and sent.id in line
    ]
    assert len(killed) == 1
    fleet.assert_still_consuming(main_pid)


def test_a_soft_limit_above_the_hard_limit_does_not_delay_the_kill(fleet: Fleet) -> None:
    main_pid = fleet.worker.pid
    key = unique("soft-above-hard")
    sent_at = time.monotonic()
    # Before the fix the hard timer was armed only when this 60 s soft limit fired.
    sent = fleet.send(key, times=1, options={"soft_time_limit": 60})

    wait_until(
        lambda: "retried" in fleet.outcomes(sent.id),
        timeout=WAIT,
        message="the hard limit (2 s) ends the first attempt, not the 60 s soft one",
    )
    print(
        f"\nsoft 60 s above hard {HARD_LIMIT} s: killed and retried after "
        f"{time.monotonic() - sent_at:.2f} s"
    )
    sent.get(timeout=WAIT)
    assert fleet.outcomes(sent.id) == ["retried", "succeeded"]
    assert fleet.effects(key) == 1
    fleet.assert_still_consuming(main_pid)


def test_a_big_message_stuck_on_every_attempt_is_dead_lettered_after_its_attempts(
    fleet: Fleet,
) -> None:
    main_pid = fleet.worker.pid
    key = unique("always-stuck")
    # The parent's own work on a 4 MB message (result backend, DLQ envelope, events) no
    # longer runs before the kill.
    sent_at = time.monotonic()
    sent = fleet.send(key, times=99, pad="x" * (4 * 1024 * 1024))

    entries = wait_until(
        lambda: [e for e in DeadLetterQueue(fleet.store).iter() if e.task_id == sent.id],
        timeout=WAIT,
        message="the DLQ entry after three hard limits",
    )
    print(
        f"\n4 MB message, 3 attempts x hard limit {HARD_LIMIT} s: dead-lettered after "
        f"{time.monotonic() - sent_at:.2f} s"
    )

    assert len(entries) == 1
    assert entries[0].failure_class == "transient"
    assert entries[0].exception_type == "TimeLimitExceeded"
    assert entries[0].attempts == 3
    assert fleet.outcomes(sent.id) == ["retried", "retried", "dead_lettered"]
    assert fleet.starts(key) == 3
    assert fleet.effects(key) == 0
    fleet.assert_still_consuming(main_pid)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def test_a_hard_limit_met_while_the_store_is_down_hands_the_message_back(
    redis_url: str, own_redis: RedisServer, sandbox: SandboxProvider
) -> None:
    # The state store is a Redis of the test's own (crashed below); the broker stays up.
    environment = Environment(redis_url=own_redis.url, sandbox_url=sandbox.url)
    producer_env = Environment(redis_url=redis_url, sandbox_url=sandbox.url, name=environment.name)
    worker = WorkerProcess(
        environment,
        concurrency=1,
        RELIABLE_BROKER__URL=redis_url,
        RELIABLE_BROKER__RESULT_BACKEND_URL=redis_url,
        RELIABLE_REDIS__UNAVAILABLE_WAIT_SECONDS="1",
        RELIABLE_REDIS__SOCKET_TIMEOUT_SECONDS="0.5",
        RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS="5",
    ).start()
    store = Store(own_redis.url, environment.prefix)
    try:
        key = unique("store-down")
        sent = producer_env.producer().send_task(
            "test.stuck_call",
            kwargs={"key": key, "seconds": STUCK_SECONDS, "times": 1},
            time_limit=3,
            soft_time_limit=2,
        )
        wait_until(
            lambda: store.client.get(f"{environment.prefix}:test:stuck:{key}"),
            timeout=WAIT,
            message="the body started",
        )
        own_redis.crash()
        wait_until(
            lambda: "task_ending_unrecorded_requeued" in worker.log_text(),
            timeout=WAIT,
            message="the hard limit could not be recorded",
        )
        own_redis.start()

        # Handed back, not acked: it runs again once the store is back (the dead
        # holder's lease lapses after 5 s), and the body's effect happens once.
        def effects() -> int:
            return sum(
                1
                for c in sandbox.effects(endpoint="webhooks")
                if (c["body"] or {}).get("key") == key
            )

        wait_until(lambda: effects() >= 1, timeout=60, message="the handed-back message ran")
        wait_until(
            lambda: "succeeded" in Ledger(store).outcomes([sent.id]).get(sent.id, []),
            timeout=WAIT,
            message="its success recorded",
        )
        assert effects() == 1
        assert int(store.client.get(f"{environment.prefix}:test:stuck:{key}")) == 2
        assert isinstance(sent.get(timeout=WAIT), dict)  # the success, not a failure
    finally:
        worker.stop()
        delete_prefix(redis_url, environment.prefix)
