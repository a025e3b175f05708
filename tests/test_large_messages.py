"""Big messages: dead-lettered as too_large without being decoded, or run once.

Above ``RELIABLE_BROKER__MAX_MESSAGE_BYTES`` (default 1 MiB) a message is dead-lettered
as poison (``too_large``) from its raw size, never decoded; the worker keeps consuming.
Below it (here: with the limit lifted) a 5 MB argument runs exactly once: masking, key
derivation and logging are linear in its size, so nothing starves the lease.
"""

from __future__ import annotations

import time

from reliability.dlq import DeadLetterQueue
from reliability.poison import MAX_RAW_BYTES
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

MB = 1024 * 1024


def deliver(producer: object, event_id: str, size: int, url: str) -> object:
    return producer.send_task(  # type: ignore[attr-defined]
        "webhooks.deliver",
        kwargs={"url": f"{url}/webhooks", "event_id": event_id, "payload": {"blob": "x" * size}},
    )


def test_5_and_50_mb_arguments_are_dead_lettered_as_too_large_and_the_worker_stays_responsive(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    producer = environment.producer()
    dlq = DeadLetterQueue(store)
    with WorkerProcess(environment, concurrency=2) as worker:
        pid = worker.pid
        for n, size in enumerate((5 * MB, 50 * MB), start=1):
            started = time.monotonic()
            deliver(producer, f"big-{n}", size, sandbox.url)
            wait_until(lambda n=n: dlq.count() == n, timeout=60, message=f"{size} bytes refused")
            refused_in = time.monotonic() - started
            # Still consuming: a small task sent after the big one completes.
            assert producer.send_task("test.echo", args=[n]).get(timeout=30) == n
            print(f"{size // MB} MB argument: dead-lettered as too_large in {refused_in:.2f}s")
        assert worker.proc is not None and worker.proc.poll() is None and worker.pid == pid
    entries = dlq.page()
    assert sorted(e.failure_class for e in entries) == ["poison", "poison"]
    assert all(e.reason.startswith("too_large: message of ") for e in entries)
    # The raw bytes are kept capped, base64 (never decoded).
    assert all(e.raw_body and len(e.raw_body) <= (MAX_RAW_BYTES * 4) // 3 + 4 for e in entries)
    assert sandbox.effects() == []


def test_a_5_mb_argument_under_the_limit_runs_exactly_once(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    producer = environment.producer()
    with WorkerProcess(
        environment,
        concurrency=2,
        RELIABLE_BROKER__MAX_MESSAGE_BYTES="0",
        RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS="3",
    ) as worker:
        result = deliver(producer, "big-ok", 5 * MB, sandbox.url)
        value = result.get(timeout=120)  # type: ignore[attr-defined]
        log = worker.log_text()
    assert value == {"event_id": "big-ok", "delivered": True}
    effects = sandbox.effects()
    assert len(effects) == 1 and effects[0]["fencing_token"] == 1
    assert "lease_lapsed" not in log and "idempotency_lease_lost" not in log
