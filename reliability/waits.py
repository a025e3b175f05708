"""Waits: the delay formulas of the retry policy, as composable tenacity wait strategies.

Why apart from :mod:`reliability.retry`: the policy decides *whether* to retry and the
wait strategies *how long* to wait; tenacity's own strategies cover exponential, linear
and fixed delays, and these add what tenacity lacks — Fibonacci growth, AWS's
decorrelated jitter and full/equal jitter around any wait. Each is a ``wait_base``, so
they compose with ``+`` like tenacity's. :func:`evaluate` runs one outside a
``Retrying`` (for Celery task retries, which never sleep here). Randomness is injected.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast, get_args

from tenacity.wait import wait_base

if TYPE_CHECKING:
    from tenacity import RetryCallState
    from tenacity.wait import WaitBaseT

Jitter = Literal["none", "full", "equal"]
JITTERS: tuple[str, ...] = get_args(Jitter)

DECORRELATED_GROWTH = 3.0  # AWS decorrelated jitter: the next wait is at most 3x the last one


def retry_after(error: BaseException | None) -> float:
    """The error's ``retry_after`` hint in seconds; 0.0 if absent or not a finite number >= 0."""
    hint = getattr(error, "retry_after", None)
    if isinstance(hint, bool) or not isinstance(hint, int | float):
        return 0.0
    return float(hint) if math.isfinite(hint) and hint >= 0 else 0.0


class WaitFibonacci(wait_base):
    """Wait ``base_delay * fib(attempt)`` seconds (1, 1, 2, 3, 5, ...), capped at ``max_delay``."""

    def __init__(self, base_delay: float, max_delay: float) -> None:
        self.base_delay, self.max_delay = base_delay, max_delay

    def __call__(self, retry_state: RetryCallState) -> float:
        if self.base_delay == 0:
            return 0.0
        previous, current = 0.0, 1.0
        for _ in range(retry_state.attempt_number - 1):
            if self.base_delay * current >= self.max_delay:
                break  # saturated: this also bounds the loop for huge attempt numbers
            previous, current = current, previous + current
        return min(self.max_delay, self.base_delay * current)


class WaitDecorrelated(wait_base):
    """AWS decorrelated jitter: ``uniform(base, 3 * previous sleep)``, capped at ``max_delay``.

    The previous sleep is ``retry_state.upcoming_sleep``: tenacity keeps the last wait there
    until it computes the next (0.0 before the first retry, read as ``base_delay``).
    """

    def __init__(self, base_delay: float, max_delay: float, rng: random.Random) -> None:
        self.base_delay, self.max_delay, self.rng = base_delay, max_delay, rng

    def __call__(self, retry_state: RetryCallState) -> float:
        previous = retry_state.upcoming_sleep or self.base_delay
        high = max(self.base_delay, previous * DECORRELATED_GROWTH)
        return min(self.max_delay, self.rng.uniform(self.base_delay, high))


class WaitJitter(wait_base):
    """Randomise a wait ``d``: none -> d; full -> uniform(0, d); equal -> d/2 + uniform(0, d/2)."""

    def __init__(self, inner: WaitBaseT, jitter: Jitter, rng: random.Random) -> None:
        self.inner, self.jitter, self.rng = inner, jitter, rng

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = float(self.inner(retry_state))
        if self.jitter == "full":
            return self.rng.uniform(0.0, delay)
        if self.jitter == "equal":
            return delay / 2 + self.rng.uniform(0.0, delay / 2)
        return delay


@dataclass(frozen=True)
class _Attempt:
    """The two fields of tenacity's ``RetryCallState`` that wait strategies read."""

    attempt_number: int
    upcoming_sleep: float  # the previous sleep; 0.0 when there was none


def evaluate(wait: wait_base, attempt: int, previous_delay: float | None) -> float:
    """Seconds ``wait`` asks for after attempt ``attempt`` (from 1) failed, outside tenacity;
    ``previous_delay`` is the wait before that attempt, if any."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    state = cast("RetryCallState", _Attempt(attempt, previous_delay or 0.0))
    return float(wait(state))
