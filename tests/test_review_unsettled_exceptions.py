"""Review: exceptions raised by the pipeline's own code escape it unsettled: the message is
acked (Celery FAILURE, ``task_acks_on_failure_or_timeout``) with no ledger or DLQ record.

``Pipeline.execute`` settles only what the body raises. Two instances:

* a body whose result ``json.dumps(..., default=str)`` cannot encode: the body ran, its
  idempotency key is left ``running``;
* a message whose ``retries`` header is not a number: ``Delivery.from_request`` raises
  ``ValueError`` before any check -- an invalid payload that never reaches the DLQ as poison.

``Settlement._succeeded`` builds the completion with ``json.dumps(result, default=str)``
outside the pipeline's ``try``: ``default=str`` does not cover dict keys, so a result such as
``{date(2024, 1, 1): 3}`` raises ``TypeError`` after the body ran. The exception escapes the
task, Celery records FAILURE and acks: no completion, no DLQ entry, no ledger record, the lease
stays ``running`` (and the breaker/concurrency tail is never settled).

The task below is registered only inside the worker this test starts (``REVIEW_TASKS``).
"""

from __future__ import annotations

import os
from datetime import date
from typing import Any

import redis

from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until

if os.environ.get("REVIEW_TASKS") == __name__:
    from reliability import ReliableTask
    from worker.app import app

    @app.task(base=ReliableTask, name="review.totals_by_day", idempotency_key_args=("key",))
    def totals_by_day(key: str) -> dict[Any, int]:
        return {date(2024, 1, 1): 3}


def _broker_copies(environment: Environment) -> int:
    client = redis.Redis.from_url(environment.redis_url)
    prefix = environment.broker_prefix
    queued = sum(client.llen(key) for key in
                 client.scan_iter(match=f"{prefix}{environment.queue}*", _type="list"))
    return int(queued) + int(client.hlen(f"{prefix}unacked"))


def test_a_result_with_non_string_keys_still_settles_the_delivery(
    environment: Environment, store: Store
) -> None:
    modules = f'["tests.support.tasks", "{__name__}"]'
    with WorkerProcess(environment, concurrency=1, REVIEW_TASKS=__name__,
                       RELIABLE_WORKER__TASK_MODULES=modules):
        sent = environment.producer().send_task("review.totals_by_day", args=["k1"])
        sent.get(timeout=30, propagate=False)
        wait_until(lambda: _broker_copies(environment) == 0, 20, message="message acked")
        idem = store.client.hgetall(store.keys.idem("review.totals_by_day",
                                                    "review.totals_by_day:key=k1"))
    outcomes = Ledger(store).outcomes([sent.id])
    dead = DeadLetterQueue(store).list()
    assert outcomes.get(sent.id), (
        f"acked with no ledger entry: celery={sent.state} {sent.result!r}, "
        f"dlq={len(dead)}, idempotency state={idem.get('state')}")


def test_a_message_with_an_unreadable_retries_header_runs_as_a_first_attempt(
    environment: Environment, store: Store
) -> None:
    with WorkerProcess(environment, concurrency=1):
        sent = environment.producer().send_task("test.echo", args=["x"], retries="two")
        assert sent.get(timeout=30) == "x"
        wait_until(lambda: _broker_copies(environment) == 0, 20, message="message acked")
    assert Ledger(store).outcomes([sent.id]) == {sent.id: ["succeeded"]}
    assert DeadLetterQueue(store).list() == []
