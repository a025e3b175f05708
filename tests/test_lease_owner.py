"""A dying stale holder never frees its successor's lease.

Restored messages keep their kombu delivery tag, so the lease owner token is a nonce the
worker's parent mints per delivery: the parent's release of a dead child's lease (any fence
of that owner) can only ever free that delivery's own lease. Sequence: A's child is paused
past its lease; the reaper restores the message and a sibling child (B) takes the key; A's
child is then killed: B keeps its lease and no third delivery runs the key concurrently.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from reliability.idempotency import derive_key
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, task_modules, wait_until

if os.environ.get("REVIEW_TASKS") == __name__:
    from reliability import ReliableTask
    from worker.app import app, runtime

    @app.task(base=ReliableTask, name="review.pid_sleep", idempotency_key_args=("key",))
    def pid_sleep(key: str, seconds: float) -> str:
        client = runtime.store.client
        runs = f"{runtime.store.keys.prefix}:review:runs:{key}"
        started = time.time()
        client.rpush(f"{runs}:pids", os.getpid())
        time.sleep(seconds)
        client.rpush(runs, f"{started:.3f}-{time.time():.3f}")
        return key


def test_a_dying_stale_holder_never_frees_its_successors_lease(
    environment: Environment, store: Store
) -> None:
    modules = task_modules("tests.support.tasks", __name__)
    runs = f"{store.keys.prefix}:review:runs:k"
    idem = store.keys.idem(
        "review.pid_sleep", derive_key("review.pid_sleep", {"key": "k"}, key_args=("key",))
    )
    with WorkerProcess(
        environment,
        concurrency=3,
        REVIEW_TASKS=__name__,
        RELIABLE_WORKER__TASK_MODULES=modules,
        RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS="2",
    ):
        environment.producer().send_task("review.pid_sleep", args=["k", 8])
        wait_until(lambda: store.client.llen(f"{runs}:pids") == 1, 20, message="A started")
        stale = int(store.client.lindex(f"{runs}:pids", 0))
        os.kill(stale, signal.SIGSTOP)
        wait_until(
            lambda: store.client.hget(idem, "fence") == "2",
            20,
            message="the reaper restored the message and B took the key",
        )
        os.kill(stale, signal.SIGKILL)
        wait_until(lambda: store.client.llen(runs) >= 1, 30, message="B finished")
        # A third delivery, if any, starts within about a second of the kill and ends
        # right after B: wait for its record, and if none comes the key ran once at a time.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: store.client.llen(runs) >= 2, 10, message="a third run")
        intervals = [tuple(map(float, r.split("-"))) for r in store.client.lrange(runs, 0, -1)]
        fence = store.client.hget(idem, "fence")
    overlapping = [
        (a, b)
        for i, a in enumerate(intervals)
        for b in intervals[i + 1 :]
        if a[0] < b[1] and b[0] < a[1]
    ]
    assert not overlapping, f"two live deliveries of one key ran at once (fence now {fence})"
