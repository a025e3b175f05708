"""A task that names a fallback is served by it while its breaker is open."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from celery import Celery

from reliability.breaker import BreakerConfig, BreakerMode, CircuitBreaker
from reliability.idempotency import derive_key
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess
from worker.sandbox import SandboxProvider


@pytest.fixture(scope="module")
def worker(shared_env: Environment) -> Iterator[WorkerProcess]:
    breakers = {"test-breaker": {"failure_threshold": 2, "recovery_timeout_seconds": 60}}
    with WorkerProcess(shared_env, RELIABLE_BREAKERS=json.dumps(breakers)) as process:
        yield process


def test_an_open_breaker_serves_the_fallback_and_records_it(
    provider: SandboxProvider, producer: Celery, shared_store: Store
) -> None:
    breaker = CircuitBreaker("test-breaker", shared_store, BreakerConfig())
    closed = producer.send_task("test.with_fallback", kwargs={"key": "live"})
    assert closed.get(timeout=30)["status"] == "ok"

    breaker.set_mode(BreakerMode.FORCED_OPEN)
    try:
        opened = producer.send_task("test.with_fallback", kwargs={"key": "cached"})
        assert opened.get(timeout=30) == {"key": "cached", "stale": True}
    finally:
        breaker.set_mode(BreakerMode.NORMAL)

    assert [e["idempotency_key"] for e in provider.effects()] == [
        derive_key("test.with_fallback", {"key": "live"}, key_args=("key",))
    ]
    outcomes = Ledger(shared_store).outcomes([closed.id, opened.id])
    assert outcomes == {closed.id: ["succeeded"], opened.id: ["fallback"]}
