"""A circuit breaker shared by the fleet, for calls outside tasks (seed 000/003 API).

Inside tasks the breaker is part of the admission script (:mod:`reliability.breaker.guard`);
here a call admits, runs (sync or async alike), is timed and recorded, in two round trips.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import structlog

from reliability import metrics, scripts
from reliability.breaker.call import BreakerCall
from reliability.breaker.config import (
    BreakerConfig,
    BreakerMode,
    CircuitBreakerError,
    CircuitState,
    breaker_keys,
)
from reliability.breaker.local import LocalBreaker
from reliability.callables import AwaitableReturned, is_async_callable, refuse_awaitable
from reliability.errors import BackendUnavailable
from reliability.store import Store

P = ParamSpec("P")
R = TypeVar("R")
log = structlog.get_logger("reliability.breaker")


_CHECK = scripts.compose(
    "breaker",
    body="""
local c = cb_cfg(ARGV, 4)
local v, w, would = cb_check(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], c)
if v == 'trial' then cb_take_trial(KEYS[3], ARGV[3], c) end
return {v or 'admit', string.format('%.6f', w or 0), would or ''}
""",
)
_RECORD = scripts.compose(
    "breaker",
    body="""
local c = cb_cfg(ARGV, 6)
return cb_record(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], c, ARGV[3], ARGV[4],
                 tonumber(ARGV[5]))
""",
)
_READ = scripts.compose(
    "breaker",
    body="""
local c = cb_cfg(ARGV, 3)
local state, mode, open_until = cb_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], c)
return {state, mode, string.format('%.6f', open_until)}
""",
)
# Reset: a breaker that was not closed closes as a recorded transition (so alerts and the
# state gauge see it); either way its window, failure count and trial leases are forgotten.
_RESET = scripts.compose(
    "breaker",
    body="""
local c = cb_cfg(ARGV, 3)
local h = redis.call('HMGET', KEYS[1], 'state', 'mode')
local state = h[1] or 'closed'
if state ~= 'closed' then
  cb_transition(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], state, 'closed', 'reset',
                h[2] or 'normal', c)
else
  redis.call('HSET', KEYS[1], 'state', 'closed', 'consec', 0, 'half_ok', 0)
  redis.call('DEL', KEYS[2], KEYS[2] .. ':n', KEYS[3])
end
return state
""",
)


@dataclass
class CircuitBreaker:
    """One named breaker, shared fleet-wide through the store.

    ``local_fallback``: when the store is unreachable, calls outside tasks are judged by
    a :class:`LocalBreaker` instead of failing (logged and counted each time; inexact).
    ``cache``: a :class:`~reliability.cache.TrackedCache` (or a callable returning one)
    serving ``state`` without a round trip, kept coherent by Redis invalidation.
    """

    name: str
    store: Store
    config: BreakerConfig = field(default_factory=BreakerConfig)
    local_fallback: bool = False
    cache: Any = None
    _local: LocalBreaker | None = field(default=None, repr=False)

    @property
    def keys(self) -> list[str]:
        return breaker_keys(self.store, self.name)

    # -- state and administration ---------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """State, mode and when an open breaker may half-open (time-based transitions applied)."""
        state, mode, open_until = self.store.run(
            _READ,
            self.keys,
            ["" if now is None else now, self.name, *self.config.args()],
            "breaker read",
        )
        return {
            "name": self.name,
            "state": state,
            "mode": mode,
            "open_until": float(open_until) or None,
        }

    @property
    def state(self) -> CircuitState:
        """The current state; from the local cache when one is configured (no round trip).

        The cached path applies the open -> half-open timeout with the local clock, for
        display; admissions always decide on Redis time.
        """
        cache = self._tracked()
        if cache is None:
            return CircuitState(self.snapshot()["state"])
        fields = cache.get_hash(self.keys[0])
        if fields.get("mode") == BreakerMode.FORCED_OPEN:
            return CircuitState.OPEN
        state = fields.get("state", "closed")
        if state == "open" and time.time() >= float(fields.get("open_until", 0)):
            return CircuitState.HALF_OPEN
        return CircuitState(state)

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted fleet-wide since the breaker last closed (seed 000).

        The count that trips ``failure_threshold``; it stays at its value while the breaker
        is open and returns to 0 when it closes or is reset. From the local cache when one
        is configured, else one read.
        """
        cache = self._tracked()
        if cache is not None:
            return int(cache.get_hash(self.keys[0]).get("consec") or 0)
        found = self.store.call("breaker read", lambda c: c.hget(self.keys[0], "consec"))
        return int(found or 0)

    def set_mode(self, mode: BreakerMode) -> None:
        """Forced-open, disabled, shadow or normal, fleet-wide and persisted."""
        self.store.call("breaker mode", lambda c: c.hset(self.keys[0], "mode", str(mode)))
        self._forget_cached()
        log.info("circuit_breaker_mode_set", breaker=self.name, mode=str(mode))

    def reset(self) -> None:
        """Close the breaker and forget its window (admin); closing is a recorded transition."""
        self.store.run(_RESET, self.keys, ["", self.name, *self.config.args()], "breaker reset")
        self._forget_cached()
        log.info("circuit_breaker_reset", breaker=self.name)

    # -- calls outside tasks --------------------------------------------------------------

    def _tracked(self) -> Any:
        return self.cache() if callable(self.cache) else self.cache

    def _forget_cached(self) -> None:
        """This process changed the state: do not serve the old one from the local cache
        until Redis's invalidation message arrives."""
        cache = self._tracked()
        if cache is not None:
            cache.invalidate(self.keys[0])

    def _fallback(self, operation: str, exc: BackendUnavailable) -> LocalBreaker:
        if not self.local_fallback:
            raise exc
        metrics.STORE_UNAVAILABLE.labels(f"breaker {operation}").inc()
        log.warning(
            "circuit_breaker_local_fallback", breaker=self.name, operation=operation, error=str(exc)
        )
        if self._local is None:
            self._local = LocalBreaker(self.config)
        return self._local

    def admit(self, owner: str, now: float | None = None) -> None:
        """Reserve the right to call now; raises :class:`CircuitBreakerError` if refused."""
        try:
            verdict, wait, _would = self.store.run(
                _CHECK,
                self.keys,
                ["" if now is None else now, self.name, owner, *self.config.args()],
                "breaker check",
            )
        except BackendUnavailable as exc:
            self._fallback("check", exc).admit(self.name)
            return
        if verdict in ("open", "busy"):
            log.info("circuit_breaker_rejected_call", breaker=self.name, reason=verdict)
            raise CircuitBreakerError(self.name, float(wait), verdict)

    def record(
        self, owner: str, error: BaseException | None, duration: float, now: float | None = None
    ) -> str:
        """Feed one call's outcome; returns the breaker's state afterwards.

        A callable that returned an awaitable it should have been awaited for
        (:class:`~reliability.callables.AwaitableReturned`) counts as neither outcome.
        """
        outcome = "ignore" if isinstance(error, AwaitableReturned) else self.config.classify(error)
        try:
            return str(
                self.store.run(
                    _RECORD,
                    self.keys,
                    [
                        "" if now is None else now,
                        self.name,
                        owner,
                        outcome,
                        duration,
                        *self.config.args(),
                    ],
                    "breaker record",
                )
            )
        except BackendUnavailable as exc:
            local = self._fallback("record", exc)
            local.record(outcome)
            return "open (local)" if local.open_until else "closed (local)"

    def guard(self) -> BreakerCall:
        """``with breaker.guard(): call()`` or ``async with breaker.guard(): await call()``:
        admits on entry (raising :class:`CircuitBreakerError` when refused), then times
        the block and records how it ended."""
        return BreakerCall(self)

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn`` through the breaker and return its result.

        A coroutine function gets an awaitable back (``await breaker.call(fetch, url)``)
        that admits, awaits, times and records when awaited, like :meth:`call_async`. A
        plain function that returns an awaitable is refused with
        :class:`~reliability.callables.AwaitableReturned`, recorded as neither outcome.
        """
        if is_async_callable(fn):
            return self.call_async(fn, *args, **kwargs)  # type: ignore[return-value,arg-type]
        with self.guard():
            result = fn(*args, **kwargs)
            refuse_awaitable(result, fn, f"circuit breaker {self.name!r}")
            return result

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker (a plain function's result is
        taken as it is); the outcome is recorded when the await ends."""
        async with self.guard():
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                return await result
            return result

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Use as a decorator on sync or async functions."""
        if is_async_callable(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call_async(fn, *args, **kwargs)  # type: ignore[arg-type]

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return self.call(fn, *args, **kwargs)

        return wrapper
