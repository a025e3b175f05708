"""A lost pool child frees its concurrency place (and breaker trial slot) at once.

The worker's parent settles the dead delivery's guards when it notices the death, so the
requeued message — and every other task under that limit — runs again promptly instead of
waiting out the limit's ``lease_seconds``.

The task below is registered only inside the worker this test starts (``REVIEW_TASKS``).
"""

from __future__ import annotations

import os
import signal

from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, task_modules

if os.environ.get("REVIEW_TASKS") == __name__:
    from reliability import ReliableTask
    from reliability.ratelimit import RateLimit
    from worker.app import app, runtime

    @app.task(
        base=ReliableTask,
        name="review.crash_limited",
        idempotency_key_args=("key",),
        rate_limits=(RateLimit(name="review-one-at-a-time", kind="concurrency", limit=1),),
    )
    def crash_limited(key: str, times: int) -> str:
        counter = f"{runtime.store.keys.prefix}:review:crash:{key}"
        n = runtime.store.client.incr(counter)
        if n <= times:
            os.kill(os.getpid(), signal.SIGKILL)
        return key


def test_a_concurrency_limited_task_whose_child_died_runs_again_promptly(
    environment: Environment, store: Store
) -> None:
    modules = task_modules("tests.support.tasks", __name__)
    with WorkerProcess(
        environment, concurrency=2, REVIEW_TASKS=__name__, RELIABLE_WORKER__TASK_MODULES=modules
    ):
        sent = environment.producer().send_task("review.crash_limited", args=["k", 1])
        try:
            value = sent.get(timeout=30)
        except Exception as exc:
            value = repr(exc)
        outcomes = Ledger(store).outcomes([sent.id])
        holders = store.client.zrange(f"{store.keys.prefix}:{{review-one-at-a-time}}:rl:-", 0, -1)
    assert value == "k", (
        f"still not run 30 s after the child died; ledger={outcomes.get(sent.id)}, "
        f"concurrency holders={holders}"
    )
