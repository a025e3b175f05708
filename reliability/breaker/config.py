"""A circuit breaker's policy, states and modes, and where its state lives in Redis."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from reliability.errors import BackendUnavailable, PermanentError, ReliabilityError
from reliability.store import Store


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerMode(StrEnum):
    NORMAL = "normal"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"
    SHADOW = "shadow"  # metrics only: transitions recorded, calls never rejected


class CircuitBreakerError(ReliabilityError):
    """The breaker is open (or its half-open trial slots are taken): call not made."""

    def __init__(self, name: str, retry_after: float, reason: str = "open") -> None:
        super().__init__(f"circuit breaker {name!r} is {reason}; retry in {retry_after:.3f}s")
        self.name = name
        self.retry_after = retry_after
        self.reason = reason


@dataclass(frozen=True)
class BreakerConfig:
    """A breaker's policy. Defaults follow seed 000's guidance for a payment API."""

    failure_threshold: int = 5  # consecutive failures; 0 = off
    failure_rate_threshold: float = 0.0  # 0..1 over the window; 0 = off
    window_type: Literal["count", "time"] = "count"
    window_size: float = 100  # calls (count) or seconds (time)
    minimum_requests: int = 10
    slow_call_seconds: float = 0.0  # 0 = off
    slow_call_rate_threshold: float = 1.0
    recovery_timeout: float = 60.0
    half_open_max_calls: int = 2
    success_threshold: int = 2
    trial_lease_seconds: float = 60.0
    # Exceptions that count as failures; `ignore_on` wins (never recorded at all).
    record_on: tuple[type[BaseException], ...] = (Exception,)
    ignore_on: tuple[type[BaseException], ...] = (PermanentError, BackendUnavailable)

    def args(self) -> list[Any]:
        """The 11 numbers breaker.lua's ``cb_cfg`` reads, in order."""
        return [
            self.failure_threshold,
            self.failure_rate_threshold,
            self.window_type,
            self.window_size,
            self.minimum_requests,
            self.slow_call_seconds,
            self.slow_call_rate_threshold,
            self.recovery_timeout,
            self.half_open_max_calls,
            self.success_threshold,
            self.trial_lease_seconds,
        ]

    def classify(self, error: BaseException | None) -> str:
        """'success', 'failure' or 'ignore' for a call that ended with ``error``."""
        if error is None:
            return "success"
        if isinstance(error, self.ignore_on) or not isinstance(error, self.record_on):
            return "ignore"
        return "failure"


# Per-service defaults (seed 000 and 003): thresholds, recovery and trial calls.
SERVICE_DEFAULTS: dict[str, BreakerConfig] = {
    "payment": BreakerConfig(
        failure_threshold=5, recovery_timeout=60.0, half_open_max_calls=2, success_threshold=2
    ),
    "notification": BreakerConfig(
        failure_threshold=15, recovery_timeout=45.0, half_open_max_calls=4, success_threshold=3
    ),
    "analytics": BreakerConfig(
        failure_threshold=25, recovery_timeout=20.0, half_open_max_calls=8, success_threshold=5
    ),
    "database": BreakerConfig(
        failure_threshold=10, recovery_timeout=30.0, half_open_max_calls=3, success_threshold=3
    ),
}

CFG_ARGS = 11
EVENTS_STREAM = "cb:events"


def breaker_keys(store: Store, name: str) -> list[str]:
    """A breaker's keys: state hash, window, trial leases, and the fleet's transitions stream."""
    base = f"{store.keys.prefix}:{{{name}}}:cb"
    return [base, f"{base}:win", f"{base}:trials", f"{store.keys.prefix}:{EVENTS_STREAM}"]
