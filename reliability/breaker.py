"""Circuit breakers whose state the whole fleet shares (semantics after resilience4j).

Failures from every process count toward one breaker in Redis (``lua/breaker.lua``):
it opens on consecutive failures, or on a failure rate or slow-call rate over a
count- or time-based sliding window once ``minimum_requests`` calls were seen; after
``recovery_timeout`` it half-opens and admits exactly ``half_open_max_calls`` trial calls
fleet-wide (trial slots are leases, so a trial whose worker dies frees its slot);
``success_threshold`` trial successes close it, any trial failure re-opens it. Which
errors count is configurable (client errors do not trip it) and store outages never
count. Every transition is appended once to a stream that :mod:`reliability.alerts`
delivers once, fleet-wide, to logs and hooks.

Inside tasks the breaker is part of the admission script (no extra round trip); outside
tasks use :meth:`CircuitBreaker.call` (``await breaker.call(fn)`` for a coroutine function),
the decorator, or :meth:`CircuitBreaker.guard` (``with`` or ``async with``); sync and async
callables are admitted, timed and recorded alike (:mod:`reliability.callables`), and
:func:`get_circuit_breaker` finds one by name (seed 003). ``state`` may be served from a
local cache kept coherent by Redis invalidation.
"""

from __future__ import annotations

import functools
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, ParamSpec, TypeVar

import structlog

from reliability import metrics, scripts
from reliability.admission import Fragment
from reliability.callables import AwaitableReturned, is_async_callable, refuse_awaitable
from reliability.errors import (
    BackendUnavailable,
    ConfigurationError,
    PermanentError,
    ReliabilityError,
)
from reliability.store import Store

log = structlog.get_logger("reliability.breaker")
P = ParamSpec("P")
R = TypeVar("R")


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
        return [self.failure_threshold, self.failure_rate_threshold, self.window_type,
                self.window_size, self.minimum_requests, self.slow_call_seconds,
                self.slow_call_rate_threshold, self.recovery_timeout,
                self.half_open_max_calls, self.success_threshold, self.trial_lease_seconds]

    def classify(self, error: BaseException | None) -> str:
        """'success', 'failure' or 'ignore' for a call that ended with ``error``."""
        if error is None:
            return "success"
        if isinstance(error, self.ignore_on) or not isinstance(error, self.record_on):
            return "ignore"
        return "failure"


# Per-service defaults (seed 000 and 003): thresholds, recovery and trial calls.
SERVICE_DEFAULTS: dict[str, BreakerConfig] = {
    "payment": BreakerConfig(failure_threshold=5, recovery_timeout=60.0,
                             half_open_max_calls=2, success_threshold=2),
    "notification": BreakerConfig(failure_threshold=15, recovery_timeout=45.0,
                                  half_open_max_calls=4, success_threshold=3),
    "analytics": BreakerConfig(failure_threshold=25, recovery_timeout=20.0,
                               half_open_max_calls=8, success_threshold=5),
    "database": BreakerConfig(failure_threshold=10, recovery_timeout=30.0,
                              half_open_max_calls=3, success_threshold=3),
}

CFG_ARGS = 11
EVENTS_STREAM = "cb:events"


def _keys(store: Store, name: str) -> list[str]:
    base = f"{store.keys.prefix}:{{{name}}}:cb"
    return [base, f"{base}:win", f"{base}:trials", f"{store.keys.prefix}:{EVENTS_STREAM}"]


# Admission fragment for one breaker. KEYS H, W, T, E; ARGV name, cfg (11), owner.
FRAGMENT = Fragment(
    name="breaker",
    libraries=("breaker",),
    nkeys=4,
    nargs=2 + CFG_ARGS,
    check="""
local cb_c = cb_cfg(ARGV, $AB + 2)
local cbv, cbw = cb_check($K1, $K2, $K3, $K4, $A1, cb_c)
if cbv == 'open' or cbv == 'busy' then return {'breaker_' .. cbv, string.format('%.6f', cbw)} end
""",
    commit=f"""if cbv == 'trial' then
  cb_take_trial($K3, ARGV[$AB + {2 + CFG_ARGS}], cb_c)
  run_extra[#run_extra + 1] = 'trial'
end""",
)

_CHECK = scripts.compose("breaker", body="""
local c = cb_cfg(ARGV, 4)
local v, w, would = cb_check(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], c)
if v == 'trial' then cb_take_trial(KEYS[3], ARGV[3], c) end
return {v or 'admit', string.format('%.6f', w or 0), would or ''}
""")
_RECORD = scripts.compose("breaker", body="""
local c = cb_cfg(ARGV, 6)
return cb_record(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], c, ARGV[3], ARGV[4],
                 tonumber(ARGV[5]))
""")
_READ = scripts.compose("breaker", body="""
local c = cb_cfg(ARGV, 3)
local state, mode, open_until = cb_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], c)
return {state, mode, string.format('%.6f', open_until)}
""")
# Reset: a breaker that was not closed closes as a recorded transition (so alerts and the
# state gauge see it); either way its window, failure count and trial leases are forgotten.
_RESET = scripts.compose("breaker", body="""
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
""")


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


class BreakerCall:
    """One call through a breaker, as a context manager for ``with`` and ``async with``.

    Entry admits (a fresh owner token, so a half-open trial slot is this call's); exit
    records the block's outcome and duration. The Redis round trips are short blocking
    calls, in async code too (there is no asyncio Redis client in the library).
    """

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.owner = f"call:{uuid.uuid4().hex}"
        self.started = 0.0

    def __enter__(self) -> BreakerCall:
        self.breaker.admit(self.owner)
        self.started = time.monotonic()
        return self

    def __exit__(self, _type: object, error: BaseException | None, _tb: object) -> None:
        self.breaker.record(self.owner, error, time.monotonic() - self.started)

    async def __aenter__(self) -> BreakerCall:
        return self.__enter__()

    async def __aexit__(self, _type: object, error: BaseException | None, _tb: object) -> None:
        self.__exit__(_type, error, _tb)


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
        return _keys(self.store, self.name)

    # -- state and administration ---------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """State, mode and when an open breaker may half-open (time-based transitions applied)."""
        state, mode, open_until = self.store.run(
            _READ, self.keys, ["" if now is None else now, self.name, *self.config.args()],
            "breaker read")
        return {"name": self.name, "state": state, "mode": mode,
                "open_until": float(open_until) or None}

    @property
    def state(self) -> CircuitState:
        """The current state; from the local cache when one is configured (no round trip).

        The cached path applies the open -> half-open timeout with the local clock, for
        display; admissions always decide on Redis time.
        """
        cache = self.cache() if callable(self.cache) else self.cache
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
        cache = self.cache() if callable(self.cache) else self.cache
        if cache is not None:
            return int(cache.get_hash(self.keys[0]).get("consec") or 0)
        found = self.store.call("breaker read", lambda c: c.hget(self.keys[0], "consec"))
        return int(found or 0)

    def set_mode(self, mode: BreakerMode) -> None:
        """Forced-open, disabled, shadow or normal, fleet-wide and persisted."""
        self.store.call("breaker mode", lambda c: c.hset(self.keys[0], "mode", str(mode)))
        log.info("circuit_breaker_mode_set", breaker=self.name, mode=str(mode))

    def reset(self) -> None:
        """Close the breaker and forget its window (admin); closing is a recorded transition."""
        self.store.run(_RESET, self.keys, ["", self.name, *self.config.args()], "breaker reset")
        log.info("circuit_breaker_reset", breaker=self.name)

    # -- calls outside tasks --------------------------------------------------------------

    def _fallback(self, operation: str, exc: BackendUnavailable) -> LocalBreaker:
        if not self.local_fallback:
            raise exc
        metrics.STORE_UNAVAILABLE.labels(f"breaker {operation}").inc()
        log.warning("circuit_breaker_local_fallback", breaker=self.name, operation=operation,
                    error=str(exc))
        if self._local is None:
            self._local = LocalBreaker(self.config)
        return self._local

    def admit(self, owner: str, now: float | None = None) -> None:
        """Reserve the right to call now; raises :class:`CircuitBreakerError` if refused."""
        try:
            verdict, wait, _would = self.store.run(
                _CHECK, self.keys,
                ["" if now is None else now, self.name, owner, *self.config.args()],
                "breaker check")
        except BackendUnavailable as exc:
            self._fallback("check", exc).admit(self.name)
            return
        if verdict in ("open", "busy"):
            log.info("circuit_breaker_rejected_call", breaker=self.name, reason=verdict)
            raise CircuitBreakerError(self.name, float(wait), verdict)

    def record(self, owner: str, error: BaseException | None, duration: float,
               now: float | None = None) -> str:
        """Feed one call's outcome; returns the breaker's state afterwards.

        A callable that returned an awaitable it should have been awaited for
        (:class:`~reliability.callables.AwaitableReturned`) counts as neither outcome.
        """
        outcome = ("ignore" if isinstance(error, AwaitableReturned)
                   else self.config.classify(error))
        try:
            return str(self.store.run(
                _RECORD, self.keys,
                ["" if now is None else now, self.name, owner, outcome, duration,
                 *self.config.args()],
                "breaker record"))
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

    async def call_async(self, fn: Callable[P, Awaitable[R]], *args: P.args,
                         **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker (a plain function's result is
        taken as it is); the outcome is recorded when the await ends."""
        async with self.guard():
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                return await result
            return result  # type: ignore[return-value]

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

    # -- inside tasks ---------------------------------------------------------------------

    def admission_args(self, owner: str) -> tuple[list[str], list[Any]]:
        return self.keys, [self.name, *self.config.args(), owner]

    def settle_args(self, error: BaseException | None, duration: float,
                    outcome: str | None = None) -> list[Any]:
        """Settle-tail arguments; ``outcome`` overrides the classification of ``error``."""
        return [self.name, outcome or self.config.classify(error), duration,
                *self.config.args()]


class BreakerRegistry:
    """Named breakers built from settings; unknown names fail loudly."""

    def __init__(self, store: Store, configs: dict[str, BreakerConfig] | None = None, *,
                 cache: Callable[[], Any] | None = None, local_fallback: bool = False) -> None:
        self.store = store
        self.configs = dict(SERVICE_DEFAULTS)
        self.configs.update(configs or {})
        self.cache = cache
        self.local_fallback = local_fallback
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        found = self._breakers.get(name)
        if found is None:
            if name not in self.configs:
                raise KeyError(f"no circuit breaker named {name!r}; known: {sorted(self.configs)}")
            found = self._breakers[name] = CircuitBreaker(
                name, self.store, self.configs[name], local_fallback=self.local_fallback,
                cache=self.cache)
        return found

    def register(self, name: str, config: BreakerConfig) -> CircuitBreaker:
        """Define a breaker in code and return it; the same definition again is a no-op.

        A name already defined with another config is refused: every process must judge
        one shared breaker by the same policy.
        """
        known = self.configs.get(name)
        if known is not None and known != config:
            raise ConfigurationError(
                f"circuit breaker {name!r} is already defined with {known}; call"
                " get_circuit_breaker without a config to use it")
        self.configs[name] = config
        return self.get(name)

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return (self.get(name) for name in sorted(self.configs))


def get_circuit_breaker(name: str, config: BreakerConfig | None = None, *,
                        store: Store | None = None) -> CircuitBreaker:
    """The breaker ``name`` (seed 003): ``cb = get_circuit_breaker("my_service", config)``.

    Without ``store`` it comes from the worker's runtime registry (settings and the
    built-in defaults), so it is the same object the tasks' breaker uses; a ``config`` for
    a new name registers it there, and one that differs from the defined policy is a
    :class:`~reliability.errors.ConfigurationError`. With ``store`` a breaker over that
    store is built from ``config`` or the built-in default for ``name``. An unknown name
    without a config raises :class:`KeyError`.
    """
    if store is None:
        from reliability.runtime import get_runtime

        registry = get_runtime().breakers
        return registry.get(name) if config is None else registry.register(name, config)
    if config is None:
        config = SERVICE_DEFAULTS.get(name)
        if config is None:
            raise KeyError(f"no circuit breaker named {name!r} among the built-in defaults"
                           f" {sorted(SERVICE_DEFAULTS)}; pass a BreakerConfig")
    return CircuitBreaker(name, store, config)
