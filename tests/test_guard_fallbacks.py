"""When Redis is unreachable, guards outside tasks fail closed unless a local fallback is
enabled; the fallback is inexact, and every use of it is logged and counted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from reliability import metrics
from reliability.breaker import BreakerConfig, CircuitBreaker, CircuitBreakerError
from reliability.errors import BackendUnavailable, TransientError
from reliability.ratelimit import RateLimit, RateLimiter
from reliability.store import Store
from tests.support.redis_server import RedisServer


@pytest.fixture
def dead_store() -> Iterator[Store]:
    """A store whose Redis was started and then crashed."""
    server = RedisServer().start()
    store = Store(server.url, "fb", socket_timeout=0.5)
    server.crash()
    yield store
    server.stop()


def failing() -> None:
    raise TransientError("downstream 503")


def counted(operation: str) -> float:
    return metrics.STORE_UNAVAILABLE.labels(operation)._value.get()


def test_a_breaker_without_fallback_fails_closed_when_redis_is_down(dead_store: Store) -> None:
    calls = []
    breaker = CircuitBreaker("svc", dead_store, BreakerConfig(failure_threshold=2))
    with pytest.raises(BackendUnavailable):
        breaker.call(calls.append, 1)
    assert calls == []


def test_a_breaker_with_local_fallback_opens_locally_and_logs_each_use(dead_store: Store) -> None:
    breaker = CircuitBreaker(
        "svc",
        dead_store,
        BreakerConfig(failure_threshold=2, recovery_timeout=60),
        local_fallback=True,
    )
    before = counted("breaker check")
    with capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(TransientError):
                breaker.call(failing)
        with pytest.raises(CircuitBreakerError) as refused:
            breaker.call(failing)
    assert "local fallback" in str(refused.value)
    assert counted("breaker check") - before == 3
    events = [e["event"] for e in logs]
    assert events.count("circuit_breaker_local_fallback") == 5  # 3 checks + 2 records


def test_a_limiter_with_local_fallback_admits_its_share_and_logs_it(dead_store: Store) -> None:
    limit = RateLimit(name="api", kind="gcra", rate=1.0, burst=4)
    limiter = RateLimiter.with_local_fallback(dead_store, limit, share=0.5)
    before = counted("rate limit")
    with capture_logs() as logs:
        granted = [limiter.try_acquire() for _ in range(5)]
    assert granted == [True, True, False, False, False]  # burst 4 * share 0.5
    assert counted("rate limit") - before == 5
    assert [e["event"] for e in logs].count("rate_limit_local_fallback") == 5


def test_a_limiter_without_fallback_raises_when_redis_is_down(dead_store: Store) -> None:
    limiter = RateLimiter(dead_store, RateLimit(name="api", kind="gcra", rate=1.0, burst=4))
    with pytest.raises(BackendUnavailable):
        limiter.try_acquire()


def test_breaker_state_is_served_from_the_invalidation_coherent_cache(bare_store: Store) -> None:
    from reliability.breaker import BreakerMode, CircuitState
    from reliability.cache import TrackedCache
    from tests.support.fleet import wait_until

    with TrackedCache(bare_store.url) as cache:
        breaker = CircuitBreaker("svc", bare_store, BreakerConfig(), cache=cache)
        assert breaker.state is CircuitState.CLOSED
        assert breaker.state is CircuitState.CLOSED
        assert cache.stats.hits == 1
        # Another process changes the breaker: the invalidation reaches this cache.
        CircuitBreaker("svc", bare_store, BreakerConfig()).set_mode(BreakerMode.FORCED_OPEN)
        wait_until(
            lambda: breaker.state is CircuitState.OPEN,
            timeout=5,
            message="the cached state invalidated",
        )
