"""The objects a worker process shares: store, ledger, DLQ, breakers, masker, knobs.

The worker builds one :class:`Runtime` from settings at start-up and installs it with
:func:`set_runtime`; tasks, signal handlers and admin tools reach it through
:func:`get_runtime`. The library itself never reads settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from reliability import metrics
from reliability.breaker import SERVICE_DEFAULTS, BreakerConfig, BreakerRegistry, CircuitBreaker
from reliability.cache import TrackedCache
from reliability.dlq import DeadLetterQueue
from reliability.errors import BackendUnavailable, ConfigurationError
from reliability.ledger import Ledger
from reliability.poison import DEFAULT_MAX_MESSAGE_BYTES
from reliability.ratelimit import DEFAULT_LIMITS, RateLimit
from reliability.retry import RetryPolicy
from reliability.security import Masker
from reliability.store import Store

T = TypeVar("T")
log = structlog.get_logger("reliability.runtime")

# Retry budget defaults, Finagle's: 20% of calls plus 10 retries per second, counted over
# 10 s. A 20% failure rate retries in full; a storm adds 25% of first attempts + floor.
DEFAULT_BUDGET_RATIO = 0.2
DEFAULT_BUDGET_MIN_RETRIES_PER_SECOND = 10.0
DEFAULT_BUDGET_WINDOW_SECONDS = 10


@dataclass(frozen=True)
class RuntimeConfig:
    """Pipeline knobs, with the defaults a task inherits unless it declares otherwise."""

    lease_seconds: float = 60.0
    result_ttl_seconds: int = 86_400
    max_redeliveries: int = 5
    # Delivery records outlive any redelivery: the visibility timeout plus a margin.
    delivery_ttl_seconds: float = 3600 + 600
    ledger_max_len: int = 1_000_000
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    # Fleet-wide retry budget per hash tag (budget.lua, after Finagle's RetryBudget): in
    # any window, retries <= budget_min_retries_per_second * window + budget_ratio * calls.
    budget_ratio: float = DEFAULT_BUDGET_RATIO
    budget_min_retries_per_second: float = DEFAULT_BUDGET_MIN_RETRIES_PER_SECOND
    budget_window_seconds: int = DEFAULT_BUDGET_WINDOW_SECONDS
    recheck_seconds: float = 1.0
    # A delivery deferred by its degradation plan looks at the level again after this.
    degradation_recheck_seconds: float = 30.0
    dlq_max_entries: int = 100_000
    dlq_max_redrives: int = 3
    # How long a task waits for an unreachable store before handing its message back.
    store_wait_seconds: float = 30.0
    # Larger messages are dead-lettered as poison (too_large) without being decoded.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.budget_ratio < 0 or self.budget_min_retries_per_second < 0:
            raise ConfigurationError(
                "retry budget: budget_ratio and budget_min_retries_per_second must be >= 0"
            )
        if self.budget_window_seconds < 1:
            raise ConfigurationError("retry budget: budget_window_seconds must be >= 1")


class Runtime:
    """Per-deployment reliability objects; per-process clients are created lazily."""

    def __init__(
        self,
        store: Store,
        config: RuntimeConfig | None = None,
        masker: Masker | None = None,
        breakers: dict[str, BreakerConfig] | None = None,
        rate_limits: dict[str, RateLimit] | None = None,
    ) -> None:
        self.store = store
        self._cache: TrackedCache | None = None
        self.breakers = BreakerRegistry(store, breakers, cache=self.tracked_cache)
        self.rate_limits = {**DEFAULT_LIMITS, **(rate_limits or {})}
        self.config = config or RuntimeConfig()
        self.masker = masker or Masker()
        self.ledger = Ledger(store, self.config.ledger_max_len)
        self.dlq = DeadLetterQueue(
            store,
            max_entries=self.config.dlq_max_entries,
            max_redrives=self.config.dlq_max_redrives,
            ledger_max_len=self.config.ledger_max_len,
        )

    def tracked_cache(self) -> TrackedCache:
        """The process's invalidation-coherent cache for reads outside tasks (lazy)."""
        if self._cache is None:
            self._cache = TrackedCache(self.store.url)
        return self._cache

    def rate_limit(self, name: str) -> RateLimit:
        """A rate limit configured in settings, by name."""
        try:
            return self.rate_limits[name]
        except KeyError:
            raise ConfigurationError(
                f"no rate limit named {name!r}; known: {sorted(self.rate_limits)}"
            ) from None

    def wait_for_store(
        self, operation: str, fn: Callable[[], T], seconds: float | None = None
    ) -> T:
        """Call ``fn``; while the store is unreachable, retry with backoff for a while.

        Never a silent pass: every failed attempt is logged and counted, and after
        ``seconds`` the last :class:`BackendUnavailable` propagates.
        """
        limit = self.config.store_wait_seconds if seconds is None else seconds
        deadline = time.monotonic() + limit
        delay = 0.05
        while True:
            try:
                return fn()
            except BackendUnavailable as exc:
                metrics.STORE_UNAVAILABLE.labels(operation).inc()
                left = deadline - time.monotonic()
                log.warning(
                    "state_store_unavailable",
                    operation=operation,
                    error=str(exc),
                    retry_in=round(min(delay, max(left, 0)), 3),
                )
                if left <= 0:
                    raise
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)

    def stored(
        self,
        operation: str,
        fn: Callable[[], T],
        *,
        wait: float | None,
        hand_back: Callable[[BackendUnavailable], object],
    ) -> T | None:
        """The one policy for a store outage while a message is held: wait for the store
        (``wait`` seconds; None: the setting), and if it stays away hand the message back
        unacked (``hand_back``: requeue it the way the caller can) instead of acking it
        unrecorded. Returns ``fn()``'s value, or None once handed back."""
        try:
            return self.wait_for_store(operation, fn, seconds=wait)
        except BackendUnavailable as exc:
            log.error("message_handed_back_store_unavailable", operation=operation, error=str(exc))
            hand_back(exc)
            return None


def runtime_of(app: Any) -> Runtime:
    """The runtime a Celery app carries (``worker.app`` installs it as ``app.reliability``)."""
    found = getattr(app, "reliability", None)
    if isinstance(found, Runtime):
        return found
    return get_runtime()


_runtime: Runtime | None = None


def set_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    if _runtime is None:
        raise ConfigurationError(
            "no reliability runtime installed: import worker.app (or call set_runtime)"
        )
    return _runtime


def get_circuit_breaker(
    name: str, config: BreakerConfig | None = None, *, store: Store | None = None
) -> CircuitBreaker:
    """The breaker ``name`` (seed 003): ``cb = get_circuit_breaker("my_service", config)``.

    Without ``store`` it comes from the worker's runtime registry (settings and the
    built-in defaults), so it is the same object the tasks' breaker uses; a ``config`` for
    a new name registers it there, and one that differs from the defined policy is a
    :class:`~reliability.errors.ConfigurationError`. With ``store`` a breaker over that
    store is built from ``config`` or the built-in default for ``name``. An unknown name
    without a config raises :class:`KeyError`.
    """
    if store is None:
        registry = get_runtime().breakers
        return registry.get(name) if config is None else registry.register(name, config)
    if config is None:
        config = SERVICE_DEFAULTS.get(name)
        if config is None:
            raise KeyError(
                f"no circuit breaker named {name!r} among the built-in defaults"
                f" {sorted(SERVICE_DEFAULTS)}; pass a BreakerConfig"
            )
    return CircuitBreaker(name, store, config)
