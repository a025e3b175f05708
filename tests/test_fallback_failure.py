"""A breaker fallback that raises is the call's failure: retried by the policy, then
dead-lettered — never acked silently.
"""

from __future__ import annotations

import json

import redis

from reliability.breaker import BreakerConfig, BreakerMode, CircuitBreaker
from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until


def _broker_copies(environment: Environment) -> int:
    client = redis.Redis.from_url(environment.redis_url)
    prefix = environment.broker_prefix
    queued = sum(
        client.llen(key)
        for key in client.scan_iter(match=f"{prefix}{environment.queue}*", _type="list")
    )
    return int(queued) + int(client.hlen(f"{prefix}unacked"))


def test_a_fallback_that_raises_is_dead_lettered_not_acked_silently(
    environment: Environment, store: Store
) -> None:
    breakers = {"test-breaker": {"failure_threshold": 2, "recovery_timeout_seconds": 60}}
    breaker = CircuitBreaker("test-breaker", store, BreakerConfig())
    breaker.set_mode(BreakerMode.FORCED_OPEN)
    with WorkerProcess(environment, concurrency=1, RELIABLE_BREAKERS=json.dumps(breakers)):
        producer = environment.producer()
        # No cached answer for this key: the fallback raises LookupError.
        sent = producer.send_task("test.with_fallback", args=["no-cache"])
        sent.get(timeout=30, propagate=False)
        wait_until(lambda: _broker_copies(environment) == 0, 20, message="message acked")
    outcomes = Ledger(store).outcomes([sent.id])
    entries = DeadLetterQueue(store).page()
    assert sent.state == "FAILURE"
    assert [e.task_id for e in entries] == [sent.id], f"acked with no DLQ entry; ledger={outcomes}"
    # The fallback's failure is the call's failure: retried by the policy, then dead-lettered.
    assert outcomes == {sent.id: ["retried", "retried", "dead_lettered"]}
    assert entries[0].exception_type == "LookupError"
