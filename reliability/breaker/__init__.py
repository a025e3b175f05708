"""Circuit breakers whose state the whole fleet shares (semantics after resilience4j).

Failures from every process count toward one breaker in Redis (``lua/breaker.lua``):
it opens on consecutive failures, or on a failure rate or slow-call rate over a
count- or time-based sliding window once ``minimum_requests`` calls were seen; after
``recovery_timeout`` it half-opens and admits exactly ``half_open_max_calls`` trial calls
fleet-wide (trial slots are leases, so a trial whose worker dies frees its slot);
``success_threshold`` trial successes close it, any trial failure re-opens it. Which
errors count is configurable (client errors do not trip it) and store outages never
count. Every transition is appended once to a stream that :mod:`reliability.breaker.alerts`
delivers once, fleet-wide, to logs and hooks.

Inside tasks the breaker is part of the admission script (no extra round trip); outside
tasks use :meth:`CircuitBreaker.call` (``await breaker.call(fn)`` for a coroutine function),
the decorator, or :meth:`CircuitBreaker.guard` (``with`` or ``async with``); sync and async
callables are admitted, timed and recorded alike (:mod:`reliability.callables`), and
:func:`reliability.get_circuit_breaker` finds one by name (seed 003). ``state`` may be served from a
local cache kept coherent by Redis invalidation.
"""

from reliability.breaker.circuit import CircuitBreaker
from reliability.breaker.config import (
    SERVICE_DEFAULTS,
    BreakerConfig,
    BreakerMode,
    CircuitBreakerError,
    CircuitState,
    breaker_keys,
)
from reliability.breaker.guard import Breaker
from reliability.breaker.local import LocalBreaker
from reliability.breaker.registry import BreakerRegistry

__all__ = [
    "SERVICE_DEFAULTS",
    "Breaker",
    "BreakerConfig",
    "BreakerMode",
    "BreakerRegistry",
    "CircuitBreaker",
    "CircuitBreakerError",
    "CircuitState",
    "LocalBreaker",
    "breaker_keys",
]
