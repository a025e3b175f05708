"""Every delivery gets an outcome even when the pipeline's own code meets odd input.

* a result JSON cannot encode (non-string dict keys): the completion is still written;
* a message whose ``retries`` header is not a number runs as a first attempt.
Anything else the pipeline itself raises is dead-lettered as poison, never acked silently.
"""

from __future__ import annotations

import os
from datetime import date
from typing import Any

import redis

from reliability.dlq import DeadLetterQueue
from reliability.idempotency import derive_key
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, task_modules, wait_until

if os.environ.get("REVIEW_TASKS") == __name__:
    from reliability import ReliableTask
    from worker.app import app

    @app.task(base=ReliableTask, name="review.totals_by_day", idempotency_key_args=("key",))
    def totals_by_day(key: str) -> dict[Any, int]:
        return {date(2024, 1, 1): 3}


def _broker_copies(environment: Environment) -> int:
    client = redis.Redis.from_url(environment.redis_url)
    prefix = environment.broker_prefix
    queued = sum(
        client.llen(key)
        for key in client.scan_iter(match=f"{prefix}{environment.queue}*", _type="list")
    )
    return int(queued) + int(client.hlen(f"{prefix}unacked"))


def test_a_result_with_non_string_keys_still_settles_the_delivery(
    environment: Environment, store: Store
) -> None:
    modules = task_modules("tests.support.tasks", __name__)
    with WorkerProcess(
        environment, concurrency=1, REVIEW_TASKS=__name__, RELIABLE_WORKER__TASK_MODULES=modules
    ):
        sent = environment.producer().send_task("review.totals_by_day", args=["k1"])
        sent.get(timeout=30, propagate=False)
        wait_until(lambda: _broker_copies(environment) == 0, 20, message="message acked")
        idem = store.client.hgetall(
            store.keys.idem(
                "review.totals_by_day",
                derive_key("review.totals_by_day", {"key": "k1"}, key_args=("key",)),
            )
        )
    outcomes = Ledger(store).outcomes([sent.id])
    dead = DeadLetterQueue(store).page()
    assert outcomes.get(sent.id), (
        f"acked with no ledger entry: celery={sent.state} {sent.result!r}, "
        f"dlq={len(dead)}, idempotency state={idem.get('state')}"
    )


def test_a_message_with_an_unreadable_retries_header_runs_as_a_first_attempt(
    environment: Environment, store: Store
) -> None:
    with WorkerProcess(environment, concurrency=1):
        sent = environment.producer().send_task("test.echo", args=["x"], retries="two")
        assert sent.get(timeout=30) == "x"
        wait_until(lambda: _broker_copies(environment) == 0, 20, message="message acked")
    assert Ledger(store).outcomes([sent.id]) == {sent.id: ["succeeded"]}
    assert DeadLetterQueue(store).page() == []
