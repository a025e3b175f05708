"""Retry policy: whether a failure is worth another try, and how long to wait before it.

One frozen :class:`RetryPolicy` serves both kinds of retry, so they cannot disagree. Celery task
retries call :meth:`RetryPolicy.decide` and get a delay in seconds or ``None`` (give up); nothing
here sleeps, the pipeline turns the delay into a deferral. In-process retries run on tenacity via
:meth:`RetryPolicy.retrying`, :meth:`RetryPolicy.async_retrying` or the policy as a decorator,
with the sleep injected. The delay math lives once, in tenacity ``wait_base`` strategies
(tenacity's own where exact; those of :mod:`reliability.waits` otherwise, all composable with
``+``), which :meth:`RetryPolicy.base` and :meth:`RetryPolicy.delay` evaluate. Randomness is
injected (``rng``) for deterministic tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast, get_args

from tenacity import AsyncRetrying, Retrying
from tenacity.retry import retry_base, retry_if_exception
from tenacity.stop import stop_after_attempt, stop_base, stop_before_delay
from tenacity.wait import wait_base, wait_exponential, wait_fixed, wait_incrementing

from reliability.callables import AwaitableReturned, is_async_callable, refuse_awaitable
from reliability.errors import ConfigurationError, PermanentError
from reliability.waits import (
    DECORRELATED_GROWTH,
    JITTERS,
    Jitter,
    WaitDecorrelated,
    WaitFibonacci,
    WaitJitter,
    evaluate,
    retry_after,
)

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = [
    "DECORRELATED_GROWTH",
    "DEFAULT_BASE_DELAY",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_DELAY",
    "DEFAULT_MULTIPLIER",
    "JITTERS",
    "STRATEGIES",
    "Jitter",
    "RetryPolicy",
    "Strategy",
    "WaitDecorrelated",
    "WaitFibonacci",
    "WaitJitter",
]

P = ParamSpec("P")
R = TypeVar("R")

Strategy = Literal["exponential", "linear", "fixed", "fibonacci", "decorrelated"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

DEFAULT_BASE_DELAY = 1.0  # seconds before the first retry
DEFAULT_MAX_DELAY = 300.0  # seconds; no single wait is longer, unless the error asks for it
DEFAULT_MULTIPLIER = 2.0  # exponential growth factor: the delay doubles per attempt
DEFAULT_MAX_ATTEMPTS = 5  # total attempts, the first included: four retries
# Stateless (os.urandom), so forked Celery workers do not all draw the same jitter sequence.
_DEFAULT_RNG: random.Random = random.SystemRandom()


def _finite(value: object) -> bool:
    """A finite real number >= 0 (bools excluded)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(cast(float, value)) and cast(float, value) >= 0


def _exception_classes(value: object) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(c, type) and issubclass(c, BaseException) for c in value
    )


class _PolicyWait(wait_base):
    """tenacity wait for a policy: :meth:`RetryPolicy.delay`, raised to the error's retry-after."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None) -> None:
        self.policy, self.rng = policy, rng

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        previous = retry_state.upcoming_sleep or None
        delay = self.policy.delay(retry_state.attempt_number, previous, self.rng)
        return max(delay, retry_after(error))


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and how long to wait; all times in seconds, attempt numbers start at 1.

    ``max_attempts`` counts every attempt, the first included. ``max_elapsed`` (default: no
    limit) gives up when the time since the first attempt plus the next delay would exceed it.
    ``give_up_on`` wins over ``retry_on``. An error's ``retry_after`` attribute raises the delay
    (even above ``max_delay``) but never past ``max_elapsed``.
    """

    strategy: Strategy = "exponential"
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    multiplier: float = DEFAULT_MULTIPLIER
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_elapsed: float | None = None
    jitter: Jitter = "full"
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = (PermanentError,)

    def __post_init__(self) -> None:
        delays_ok = _finite(self.base_delay) and _finite(self.max_delay)
        attempts = self.max_attempts
        rules = (
            ("strategy", self.strategy in STRATEGIES, f"one of {STRATEGIES}"),
            ("jitter", self.jitter in JITTERS, f"one of {JITTERS}"),
            ("base_delay", _finite(self.base_delay), "a finite number of seconds >= 0"),
            ("max_delay", delays_ok and self.max_delay >= self.base_delay, "seconds >= base_delay"),
            ("multiplier", _finite(self.multiplier) and self.multiplier >= 1, "a number >= 1"),
            ("max_attempts", type(attempts) is int and attempts >= 1, "an int >= 1"),
            ("max_elapsed", self.max_elapsed is None or _finite(self.max_elapsed), "None or >= 0"),
            ("retry_on", _exception_classes(self.retry_on), "a tuple of exception classes"),
            ("give_up_on", _exception_classes(self.give_up_on), "a tuple of exception classes"),
        )
        for name, ok, rule in rules:
            if not ok:
                value = getattr(self, name)
                raise ConfigurationError(f"RetryPolicy.{name} must be {rule}, got {value!r}")

    # -- delay math: evaluates the tenacity wait strategies, the one source of the formulas --

    def _strategy_wait(self, rng: random.Random) -> wait_base:
        base, cap = self.base_delay, self.max_delay
        if self.strategy == "exponential":
            # tenacity caps the exponent once base * multiplier**n reaches the cap (no overflow);
            # a zero base never grows, and would otherwise overflow to the cap.
            if base == 0:
                return wait_fixed(0)
            # float: an int multiplier would make int ** int for huge attempts (a bignum, slow).
            return wait_exponential(multiplier=base, exp_base=float(self.multiplier), max=cap)
        if self.strategy == "linear":
            return wait_incrementing(start=base, increment=base, max=cap)
        if self.strategy == "fibonacci":
            return WaitFibonacci(base, cap)
        if self.strategy == "decorrelated":
            return WaitDecorrelated(base, cap, rng)
        return wait_fixed(base)

    def base(
        self, attempt: int, previous_delay: float | None = None, rng: random.Random | None = None
    ) -> float:
        """The delay before attempt ``attempt + 1`` after ``attempt`` failed, before jitter.

        Capped at ``max_delay``. ``previous_delay`` and ``rng`` matter only to "decorrelated".
        """
        return evaluate(self._strategy_wait(rng or _DEFAULT_RNG), attempt, previous_delay)

    def delay(
        self, attempt: int, previous_delay: float | None = None, rng: random.Random | None = None
    ) -> float:
        """:meth:`base` with the jitter applied (not to "decorrelated", random already)."""
        rng = rng or _DEFAULT_RNG
        wait = self._strategy_wait(rng)
        if self.strategy != "decorrelated" and self.jitter != "none":
            wait = WaitJitter(wait, self.jitter, rng)
        return evaluate(wait, attempt, previous_delay)

    def is_retryable(self, error: BaseException) -> bool:
        """True if ``error`` is one of ``retry_on`` and none of ``give_up_on`` (a callable
        that returned an awaitable unawaited is a programming error: never retried)."""
        if isinstance(error, AwaitableReturned):
            return False
        return isinstance(error, self.retry_on) and not isinstance(error, self.give_up_on)

    def decide(
        self,
        attempt: int,
        error: BaseException,
        elapsed: float = 0.0,
        previous_delay: float | None = None,
        rng: random.Random | None = None,
    ) -> float | None:
        """Seconds to wait before retrying after ``attempt`` failed with ``error``; None: give up.

        Gives up on a non-retryable error, when ``attempt >= max_attempts``, or when
        ``elapsed`` (seconds since the first attempt) plus the delay would exceed
        ``max_elapsed``. The error's ``retry_after`` hint raises the delay.
        """
        if attempt >= self.max_attempts or not self.is_retryable(error):
            return None
        delay = max(self.delay(attempt, previous_delay, rng), retry_after(error))
        if self.max_elapsed is not None and elapsed + delay > self.max_elapsed:
            return None
        return delay

    def schedule(self, rng: random.Random | None = None) -> list[float]:
        """The delays after attempts 1 .. max_attempts-1, ignoring hints and ``max_elapsed``."""
        delays: list[float] = []
        previous: float | None = None
        for attempt in range(1, self.max_attempts):
            previous = self.delay(attempt, previous, rng)
            delays.append(previous)
        return delays

    # -- tenacity integration (in-process retries) --

    def tenacity_wait(self, *, rng: random.Random | None = None) -> wait_base:
        """A tenacity wait: :meth:`delay` for the attempt and previous sleep, raised to the hint."""
        return _PolicyWait(self, rng)

    def tenacity_stop(self) -> stop_base:
        """Stop after ``max_attempts``, or before a sleep that would end past ``max_elapsed``."""
        stop: stop_base = stop_after_attempt(self.max_attempts)
        if self.max_elapsed is not None:
            # stop_before_delay (elapsed + upcoming sleep), the same rule as decide().
            stop = stop | stop_before_delay(self.max_elapsed)
        return stop

    def tenacity_retry(self) -> retry_base:
        """Retry exactly the errors :meth:`is_retryable` accepts."""
        return retry_if_exception(self.is_retryable)

    def _tenacity_options(self, reraise: bool, rng: random.Random | None) -> dict[str, Any]:
        wait = self.tenacity_wait(rng=rng)
        stop, retry = self.tenacity_stop(), self.tenacity_retry()
        return {"stop": stop, "wait": wait, "retry": retry, "reraise": reraise}

    def retrying(
        self,
        *,
        sleep: Callable[[float], None] = time.sleep,
        reraise: bool = True,
        rng: random.Random | None = None,
    ) -> Retrying:
        """A tenacity ``Retrying`` for this policy; ``reraise`` raises the last error itself."""
        return Retrying(sleep=sleep, **self._tenacity_options(reraise, rng))

    def async_retrying(
        self,
        *,
        sleep: Callable[[float], Awaitable[None] | None] | None = None,
        reraise: bool = True,
        rng: random.Random | None = None,
    ) -> AsyncRetrying:
        """A tenacity ``AsyncRetrying`` for this policy; ``sleep`` defaults to tenacity's."""
        options = self._tenacity_options(reraise, rng)
        if sleep is not None:
            options["sleep"] = sleep
        return AsyncRetrying(**options)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` to retry in-process; coroutine functions use ``AsyncRetrying``.

        A plain function that returns an awaitable is refused at its first attempt with
        :class:`~reliability.callables.AwaitableReturned` (never retried): its failures
        would surface only after the retrying had ended.
        """
        if is_async_callable(fn):
            return cast("Callable[P, R]", self.async_retrying().wraps(fn))

        @functools.wraps(fn)
        def attempt(*args: P.args, **kwargs: P.kwargs) -> R:
            result = fn(*args, **kwargs)
            refuse_awaitable(result, fn, "RetryPolicy")
            return result

        return self.retrying().wraps(attempt)

    def replace(self, **changes: Any) -> RetryPolicy:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)
