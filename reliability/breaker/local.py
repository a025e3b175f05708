"""The in-process breaker used when the store is unreachable (inexact, opt-in)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from reliability.breaker.config import BreakerConfig, CircuitBreakerError


@dataclass
class LocalBreaker:
    """An in-process breaker for when the store is unreachable: documented as inexact.

    It sees only this process's calls (consecutive failures and recovery timeout; one
    trial call when half-open), so the fleet's breakers may disagree until Redis returns.
    """

    config: BreakerConfig
    clock: Callable[[], float] = time.monotonic
    consec: int = 0
    open_until: float = 0.0
    trial: bool = False

    def admit(self, name: str) -> None:
        now = self.clock()
        if self.open_until and now < self.open_until:
            raise CircuitBreakerError(name, self.open_until - now, "open (local fallback)")
        if self.open_until and self.trial:
            raise CircuitBreakerError(name, 0.5, "busy (local fallback)")
        if self.open_until:
            self.trial = True

    def record(self, outcome: str) -> None:
        if outcome == "ignore":
            self.trial = False
            return
        if outcome == "failure":
            self.consec += 1
            threshold = self.config.failure_threshold or 1
            if self.trial or self.consec >= threshold:
                self.open_until = self.clock() + self.config.recovery_timeout
        else:
            self.consec = 0
            if self.trial:
                self.open_until = 0.0
        self.trial = False
