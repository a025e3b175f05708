"""A body that raises Celery's own control-flow exceptions still leaves an outcome.

``raise Reject(exc, requeue=False)`` (Celery's idiom for a poison message) is dead-lettered
as permanent; ``raise Ignore()`` is recorded as revoked ("ignored by the task").

The tasks below are registered only inside the worker this test starts (``REVIEW_TASKS``).
"""

from __future__ import annotations

import os

import redis

from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, task_modules, wait_until

if os.environ.get("REVIEW_TASKS") == __name__:
    from celery.exceptions import Ignore, Reject

    from reliability import ReliableTask
    from worker.app import app

    @app.task(base=ReliableTask, name="review.rejects", idempotency_key_args=("key",))
    def rejects(key: str) -> str:
        raise Reject(f"cannot process {key}", requeue=False)

    @app.task(base=ReliableTask, name="review.ignores", idempotency_key_args=("key",))
    def ignores(key: str) -> str:
        raise Ignore()


def _broker_copies(environment: Environment) -> int:
    client = redis.Redis.from_url(environment.redis_url)
    prefix = environment.broker_prefix
    queued = sum(
        client.llen(key)
        for key in client.scan_iter(match=f"{prefix}{environment.queue}*", _type="list")
    )
    return int(queued) + int(client.hlen(f"{prefix}unacked"))


def test_a_body_that_rejects_or_ignores_its_message_still_leaves_an_outcome(
    environment: Environment, store: Store
) -> None:
    modules = task_modules("tests.support.tasks", __name__)
    with WorkerProcess(
        environment, concurrency=1, REVIEW_TASKS=__name__, RELIABLE_WORKER__TASK_MODULES=modules
    ) as worker:
        producer = environment.producer()
        rejected = producer.send_task("review.rejects", args=["r"])
        ignored = producer.send_task("review.ignores", args=["i"])
        wait_until(
            lambda: worker.log_text().count("idempotency_lock_released_on_error") == 2,
            20,
            message="both bodies ran",
        )
        wait_until(lambda: _broker_copies(environment) == 0, 20, message="both messages gone")
    rec = Ledger(store).reconcile([rejected.id, ignored.id])
    dead = [e.task_id for e in DeadLetterQueue(store).page()]
    assert rec.lost == 0, f"gone from the broker with no final outcome: {rec}, dlq={dead}"
