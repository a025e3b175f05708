"""In-process token buckets: one pure refill core, an asyncio front and a threaded front.

``AsyncTokenBucket`` keeps seed 000's API for asyncio clients; ``LocalTokenBucket`` is its
blocking twin, the documented-*inexact* fallback limiter used when Redis is unreachable (it
limits one process, not the fleet). Both reserve tokens under a lock and sleep outside it: a
request that cannot be served now takes its tokens at once (the bucket goes into debt) and sleeps
exactly until the refill covers them. Callers are therefore served in arrival order (FIFO), a
large request is never starved by small ones, and grants over any interval never exceed
``capacity + rate * interval``. The clock and the sleep are injected, so tests need no real time.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable

import structlog

from reliability.errors import ConfigurationError

log = structlog.get_logger("reliability.ratelimit.bucket")

Clock = Callable[[], float]


def _check_rate(rate: float) -> float:
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not (math.isfinite(rate) and rate > 0)
    ):
        raise ConfigurationError(f"token bucket rate must be a finite number > 0, got {rate!r}")
    return float(rate)


class TokenBucketCore:
    """Pure token-bucket arithmetic over explicit times in seconds: no clock, no lock, no I/O.

    ``tokens`` may go negative: that is the debt of reservations still waiting for refill.
    """

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigurationError(f"token bucket capacity must be an int >= 1, got {capacity!r}")
        self.rate = _check_rate(rate)
        self.capacity = capacity
        self.tokens = float(capacity)
        self.updated = now

    def refill(self, now: float) -> None:
        """Add ``rate`` tokens per second elapsed since the last update, up to ``capacity``."""
        if now > self.updated:
            self.tokens = min(float(self.capacity), self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def available(self, now: float) -> float:
        """Tokens a request could take right now (0 while waiters are in debt)."""
        self.refill(now)
        return max(0.0, self.tokens)

    def wait_for(self, tokens: int, now: float) -> float:
        """Seconds until ``tokens`` more could be granted (0.0 when they can be now)."""
        self.refill(now)
        return 0.0 if self.tokens >= tokens else (tokens - self.tokens) / self.rate

    def take(self, tokens: int, now: float) -> float:
        """Reserve ``tokens`` now; returns the seconds the caller must wait before using them."""
        wait = self.wait_for(tokens, now)
        self.tokens -= tokens
        return wait

    def refund(self, tokens: int, now: float) -> None:
        """Give back a reservation whose waiter gave up (cancelled while sleeping)."""
        self.refill(now)
        self.tokens = min(float(self.capacity), self.tokens + tokens)

    def set_rate(self, rate: float, now: float) -> None:
        """Change the refill rate; time elapsed so far is credited at the old rate."""
        rate = _check_rate(rate)
        self.refill(now)
        self.rate = rate

    def reset(self, now: float) -> None:
        """Fill the bucket; waiters already sleeping keep their reservations."""
        self.tokens, self.updated = float(self.capacity), now


class _BucketFront:
    """What both fronts share: argument checks, the reservation decision and its log events."""

    def __init__(self, rate: float, capacity: int, clock: Clock) -> None:
        self._clock = clock
        self._core = TokenBucketCore(rate, capacity, clock())

    @property
    def rate(self) -> float:
        return self._core.rate

    @property
    def capacity(self) -> int:
        return self._core.capacity

    def _reserve(
        self, tokens: int, timeout: float | None, *, log_timeout: bool = True
    ) -> float | None:
        """Under the front's lock: the wait before the grant, or None when over ``timeout``."""
        if (
            isinstance(tokens, bool)
            or not isinstance(tokens, int)
            or not (1 <= tokens <= self._core.capacity)
        ):
            raise ValueError(f"tokens must be an int in [1, {self._core.capacity}], got {tokens!r}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        now = self._clock()
        wait = self._core.wait_for(tokens, now)
        if timeout is not None and wait > timeout:  # give up now rather than sleep in vain
            if log_timeout:
                log.warning(
                    "token_acquisition_timeout",
                    tokens=tokens,
                    timeout_seconds=timeout,
                    wait_seconds=round(wait, 6),
                )
            return None
        self._core.take(tokens, now)
        if wait == 0.0:
            log.debug(
                "tokens_acquired_immediate", tokens=tokens, available=round(self._core.tokens, 6)
            )
        else:
            log.info("tokens_waiting", tokens=tokens, wait_seconds=round(wait, 6))
        return wait


class AsyncTokenBucket(_BucketFront):
    """Token bucket for asyncio: ``rate`` tokens per second, bursts up to ``capacity``."""

    def __init__(
        self,
        rate: float,
        capacity: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        super().__init__(rate, capacity, clock)
        self._sleep = sleep
        self._lock = asyncio.Lock()

    @property
    def available_tokens(self) -> float:
        return self._core.available(self._clock())

    async def acquire(self, tokens: int = 1, timeout: float | None = None) -> bool:
        """Wait until ``tokens`` are granted; False at once if that would take over ``timeout``."""
        async with self._lock:
            wait = self._reserve(tokens, timeout)
        if wait is None:
            return False
        if wait > 0:
            try:
                await self._sleep(wait)
            except BaseException:  # cancelled: let the next caller have the tokens
                async with self._lock:
                    self._core.refund(tokens, self._clock())
                raise
            log.debug("tokens_acquired_after_wait", tokens=tokens, waited_seconds=round(wait, 6))
        return True

    async def try_acquire(self, tokens: int = 1) -> bool:
        """Take ``tokens`` only if available now (never jumps ahead of waiting callers)."""
        async with self._lock:
            return self._reserve(tokens, 0.0, log_timeout=False) is not None

    async def set_rate(self, rate: float) -> None:
        """Change the refill rate (tokens per second) from now on; sleepers keep their wait."""
        async with self._lock:
            self._core.set_rate(rate, self._clock())

    async def reset(self) -> None:
        """Fill the bucket to ``capacity``."""
        async with self._lock:
            self._core.reset(self._clock())


class LocalTokenBucket(_BucketFront):
    """Thread-safe blocking token bucket for one process (the inexact local fallback)."""

    def __init__(
        self,
        rate: float,
        capacity: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        super().__init__(rate, capacity, clock)
        self._sleep = sleep
        self._lock = threading.Lock()

    @property
    def available_tokens(self) -> float:
        with self._lock:
            return self._core.available(self._clock())

    def acquire(self, tokens: int = 1, timeout: float | None = None) -> bool:
        """Block until ``tokens`` are granted; False at once if that would take over ``timeout``."""
        with self._lock:
            wait = self._reserve(tokens, timeout)
        if wait is None:
            return False
        if wait > 0:
            try:
                self._sleep(wait)
            except BaseException:
                with self._lock:
                    self._core.refund(tokens, self._clock())
                raise
            log.debug("tokens_acquired_after_wait", tokens=tokens, waited_seconds=round(wait, 6))
        return True

    def try_acquire(self, tokens: int = 1) -> bool:
        """Take ``tokens`` only if available now (never jumps ahead of waiting callers)."""
        with self._lock:
            return self._reserve(tokens, 0.0, log_timeout=False) is not None

    def set_rate(self, rate: float) -> None:
        """Change the refill rate (tokens per second) from now on; sleepers keep their wait."""
        with self._lock:
            self._core.set_rate(rate, self._clock())

    def reset(self) -> None:
        """Fill the bucket to ``capacity``."""
        with self._lock:
            self._core.reset(self._clock())
