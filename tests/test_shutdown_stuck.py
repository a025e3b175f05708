"""Warm and cold shutdowns end, even with a stuck pool child, and lose nothing.

The stuck child holds the GIL in a C call with every signal but SIGKILL blocked: neither
its soft time limit nor Celery's SIGTERM can stop it. A warm shutdown (SIGTERM) gives it
the soft-shutdown grace, then kills it and hands its message back to the queue unacked;
a cold one (a second SIGINT, or SIGQUIT) does that at once. Either way the worker exits
within a bounded wait, and a second worker runs the message exactly once. An idle worker
stops at once, warm or cold, instead of sitting through the grace.

Run with ``-s`` to see the measured times (printed, never asserted).
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest
import redis

from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

GRACE = 3.0  # RELIABLE_WORKER__SOFT_SHUTDOWN_TIMEOUT_SECONDS of the stuck-worker tests
LONG_GRACE = 30.0  # cold shutdowns and idle workers must not wait for it
# What a shutdown may take beyond the grace: SIGTERM, SIGKILL one second later, Celery's
# own teardown (about two seconds on this machine).
MARGIN = 8.0
WAIT = 30.0
LEASE_TTL = "60"  # a stuck body cannot renew its lease (issue 6, item 3): keep the reaper out


def start_worker(environment: Environment, grace: float) -> WorkerProcess:
    return WorkerProcess(
        environment,
        concurrency=1,
        RELIABLE_WORKER__SOFT_SHUTDOWN_TIMEOUT_SECONDS=str(grace),
        RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS=LEASE_TTL,
    ).start()


def queued(environment: Environment) -> tuple[int, int]:
    """(messages waiting in the worker queue, messages delivered but unacked)."""
    client = redis.Redis.from_url(environment.redis_url)
    try:
        prefix = environment.broker_prefix
        return (
            int(client.llen(f"{prefix}{environment.queue}")),
            int(client.hlen(f"{prefix}unacked")),
        )
    finally:
        client.close()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Every worker a test starts; all are stopped (killed if need be) at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
        worker.stop()


def stuck_message(
    environment: Environment, store: Store, worker: WorkerProcess, key: str
) -> tuple[str, list[int]]:
    """Send a task whose first delivery is stuck; wait until it runs. Its id, the children."""
    sent = environment.producer().send_task(
        "test.stuck_call", kwargs={"key": key, "seconds": 300, "times": 1}
    )
    wait_until(
        lambda: store.client.get(f"{environment.prefix}:test:stuck:{key}"),
        timeout=WAIT,
        message="the stuck delivery started",
    )
    return sent.id, [child.pid for child in worker.children()]


def exit_after(worker: WorkerProcess, timeout: float) -> float:
    """Seconds until the worker process exited; fails the test after ``timeout``."""
    assert worker.proc is not None
    started = time.monotonic()
    try:
        worker.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within {timeout} s:\n{worker.log_text()[-3000:]}")
    return time.monotonic() - started


def assert_handed_back_and_run_once(
    environment: Environment,
    store: Store,
    sandbox: SandboxProvider,
    workers: list[WorkerProcess],
    task_id: str,
    key: str,
    children: list[int],
) -> None:
    assert not [
        pid
        for pid in children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ], "a child outlived"
    assert queued(environment) == (1, 0)  # back in the queue, not left unacked
    assert Ledger(store).outcomes([task_id]).get(task_id) == ["requeued"]

    second = start_worker(environment, GRACE)
    workers.append(second)
    wait_until(
        lambda: "succeeded" in Ledger(store).outcomes([task_id]).get(task_id, []),
        timeout=WAIT,
        message="the second worker ran the handed-back message",
    )
    effects = [
        c for c in sandbox.effects(endpoint="webhooks") if (c["body"] or {}).get("key") == key
    ]
    assert len(effects) == 1
    assert int(store.client.get(f"{environment.prefix}:test:stuck:{key}") or 0) == 2
    assert Ledger(store).outcomes([task_id]).get(task_id) == ["requeued", "succeeded"]
    # The completion is recorded before the ack: wait for the ack to land.
    wait_until(lambda: queued(environment) == (0, 0), timeout=10, message="message acked")


def test_a_warm_shutdown_kills_a_stuck_child_after_the_grace_and_hands_its_message_back(
    environment: Environment, store: Store, sandbox: SandboxProvider, workers: list[WorkerProcess]
) -> None:
    first = start_worker(environment, GRACE)
    workers.append(first)
    key = f"warm-{uuid.uuid4().hex[:8]}"
    task_id, children = stuck_message(environment, store, first, key)

    first.signal(signal.SIGTERM)
    took = exit_after(first, GRACE + MARGIN)
    print(f"\nwarm shutdown (SIGTERM), stuck child, grace {GRACE} s: exited after {took:.2f} s")

    assert first.proc is not None and first.proc.returncode == 0
    assert "shutdown_tasks_killed" in first.log_text()
    assert_handed_back_and_run_once(environment, store, sandbox, workers, task_id, key, children)


@pytest.mark.parametrize(
    "signals", [("SIGINT", "SIGINT"), ("SIGQUIT",)], ids=["second-ctrl-c", "sigquit"]
)
def test_a_cold_shutdown_kills_a_stuck_child_at_once_and_hands_its_message_back(
    environment: Environment,
    store: Store,
    sandbox: SandboxProvider,
    workers: list[WorkerProcess],
    signals: tuple[str, ...],
) -> None:
    first = start_worker(environment, LONG_GRACE)
    workers.append(first)
    key = f"cold-{uuid.uuid4().hex[:8]}"
    task_id, children = stuck_message(environment, store, first, key)

    started = time.monotonic()
    for number, name in enumerate(signals):
        if number:
            wait_until(
                lambda: "Warm shutdown" in first.log_text(),
                timeout=WAIT,
                message="the first Ctrl-C began a warm shutdown",
            )
        first.signal(getattr(signal, name))
    # Well within the 30 s grace: a cold shutdown does not wait for it.
    exit_after(first, MARGIN + 2)
    took = time.monotonic() - started
    print(
        f"\ncold shutdown ({' then '.join(signals)}), stuck child, grace {LONG_GRACE} s: "
        f"exited after {took:.2f} s"
    )

    assert '"cold": true' in first.log_text()
    assert_handed_back_and_run_once(environment, store, sandbox, workers, task_id, key, children)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGQUIT"])
def test_an_idle_worker_stops_at_once_without_sitting_through_the_grace(
    environment: Environment, workers: list[WorkerProcess], name: str
) -> None:
    worker = start_worker(environment, LONG_GRACE)
    workers.append(worker)
    # Idle after some work (its message acked).
    assert environment.producer().send_task("test.echo", args=["x"]).get(timeout=WAIT) == "x"
    wait_until(lambda: queued(environment) == (0, 0), timeout=WAIT, message="the echo acked")

    worker.signal(getattr(signal, name))
    took = exit_after(worker, MARGIN)
    print(f"\nidle worker, {name}, grace {LONG_GRACE} s: exited after {took:.2f} s")
    assert "shutdown_tasks_killed" not in worker.log_text()
