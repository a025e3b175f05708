"""A rate limit for code outside tasks: acquire, try_acquire, hold, set_rate, reset."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import structlog

from reliability import metrics, scripts
from reliability.errors import BackendUnavailable
from reliability.ratelimit.bucket import LocalTokenBucket
from reliability.ratelimit.limit import COUNT_FIELDS, RateLimit, limit_keys
from reliability.store import Store

log = structlog.get_logger("reliability.ratelimit")


_ACQUIRE = scripts.compose(
    "ratelimit",
    body="""
local p1, p2 = rl_params(KEYS[2], ARGV[3], ARGV[4])
local t = rl_earliest(ARGV[2], KEYS[1], p1, p2, tonumber(ARGV[5]), now)
if t == nil then return {'busy', '1.000000'} end
if t > now and ARGV[7] ~= '1' then return {'wait', string.format('%.6f', t - now)} end
rl_commit(ARGV[2], KEYS[1], p1, p2, tonumber(ARGV[5]), t, ARGV[6])
return {'ok', string.format('%.6f', t - now)}
""",
)
_RELEASE = scripts.compose("ratelimit", body="return rl_release(KEYS[1], ARGV[2])")
_AVAILABLE = scripts.compose(
    "ratelimit",
    body="""
local p1, p2 = rl_params(KEYS[2], ARGV[3], ARGV[4])
return string.format('%.6f', rl_available(ARGV[2], KEYS[1], p1, p2))
""",
)
_NEXT = scripts.compose(
    "ratelimit",
    body="""
local p1, p2 = rl_params(KEYS[2], ARGV[3], ARGV[4])
local t = rl_earliest(ARGV[2], KEYS[1], p1, p2, tonumber(ARGV[5]), now)
if t == nil then return '-1' end
return string.format('%.6f', t - now)
""",
)


class RateLimiter:
    """One limit (at one scope value) for code outside tasks.

    ``local_fallback``: a :class:`~reliability.ratelimit.bucket.LocalTokenBucket` used while the
    store is unreachable — inexact (it sees only this process), logged and counted each
    time; without one, an unreachable store raises :class:`BackendUnavailable`.
    """

    def __init__(
        self,
        store: Store,
        limit: RateLimit,
        scope: str = "-",
        *,
        sleep: Callable[[float], None] = time.sleep,
        local_fallback: LocalTokenBucket | None = None,
    ) -> None:
        self.store = store
        self.limit = limit
        self.keys = limit_keys(store, limit, scope)
        self._sleep = sleep
        self.local_fallback = local_fallback

    @classmethod
    def with_local_fallback(
        cls, store: Store, limit: RateLimit, scope: str = "-", *, share: float = 1.0
    ) -> RateLimiter:
        """A limiter whose fallback allows ``share`` of the fleet-wide rate per process."""
        if limit.kind == "gcra":
            rate, burst = limit.rate, limit.burst
        elif limit.kind == "concurrency":
            rate, burst = float(limit.limit), limit.limit
        else:
            rate, burst = limit.max_requests / limit.window_seconds, limit.max_requests
        bucket = LocalTokenBucket(max(rate * share, 1e-6), max(1, int(burst * share)))
        return cls(store, limit, scope, local_fallback=bucket)

    def _run(self, cost: int, owner: str, reserve: bool, now: float | None) -> tuple[str, float]:
        p1, p2 = self.limit.params
        verdict, wait = self.store.run(
            _ACQUIRE,
            self.keys,
            [
                "" if now is None else now,
                self.limit.kind,
                p1,
                p2,
                cost,
                owner,
                "1" if reserve else "0",
            ],
            "rate limit",
        )
        return str(verdict), float(wait)

    def _fallback(self, exc: BackendUnavailable) -> LocalTokenBucket:
        if self.local_fallback is None:
            raise exc
        metrics.STORE_UNAVAILABLE.labels("rate limit").inc()
        log.warning("rate_limit_local_fallback", limit=self.limit.name, error=str(exc))
        return self.local_fallback

    def try_acquire(
        self, tokens: int = 1, now: float | None = None, owner: str | None = None
    ) -> bool:
        """Take ``tokens`` now if the fleet-wide limit allows; never waits.

        For a concurrency limit pass ``owner`` and :meth:`release` it (or use :meth:`hold`).
        """
        try:
            verdict, _ = self._run(tokens, owner or f"try:{time.monotonic_ns()}", False, now)
        except BackendUnavailable as exc:
            return self._fallback(exc).try_acquire(tokens)
        return verdict == "ok"

    def acquire(
        self, tokens: int = 1, timeout: float | None = None, owner: str | None = None
    ) -> bool:
        """Wait for ``tokens`` (up to ``timeout`` seconds); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        owner = owner or f"acq:{time.monotonic_ns()}"
        try:
            verdict, wait = self._run(tokens, owner, False, None)
        except BackendUnavailable as exc:
            return self._fallback(exc).acquire(tokens, timeout)
        if verdict == "ok":
            log.debug("tokens_acquired_immediate", limit=self.limit.name, tokens=tokens)
            return True
        log.info("tokens_waiting", limit=self.limit.name, tokens=tokens, wait_seconds=wait)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                log.warning("token_acquisition_timeout", limit=self.limit.name, tokens=tokens)
                return False
            self._sleep(min(wait, left) if left is not None else wait)
            verdict, wait = self._run(tokens, owner, False, None)
            if verdict == "ok":
                log.info("tokens_acquired_after_wait", limit=self.limit.name, tokens=tokens)
                return True

    @contextmanager
    def hold(self, tokens: int = 1, timeout: float | None = None) -> Iterator[str]:
        """Hold places of a concurrency limit for a block; yields the owner, always released.

        Raises :class:`TimeoutError` if no place frees within ``timeout``.
        """
        owner = f"hold:{time.monotonic_ns()}"
        if not self.acquire(tokens, timeout, owner=owner):
            raise TimeoutError(f"no place in rate limit {self.limit.name} within {timeout}s")
        try:
            yield owner
        finally:
            self.release(owner)

    def release(self, owner: str) -> None:
        """Free the concurrency places taken with ``owner`` (all of them, whatever the cost)."""
        self.store.run(_RELEASE, self.keys[:1], ["", owner], "rate limit release")

    @property
    def available_tokens(self) -> float:
        p1, p2 = self.limit.params
        return float(
            self.store.run(_AVAILABLE, self.keys, ["", self.limit.kind, p1, p2], "rate limit read")
        )

    def seconds_until_available(self, tokens: int = 1) -> float | None:
        """How long until ``tokens`` would be admitted, taking nothing (0: now; None: a
        full concurrency limit, which frees on release, not on time). For Retry-After."""
        p1, p2 = self.limit.params
        wait = float(
            self.store.run(
                _NEXT, self.keys, ["", self.limit.kind, p1, p2, tokens], "rate limit read"
            )
        )
        return None if wait < 0 else wait

    def set_rate(
        self,
        rate: float | None = None,
        burst: int | None = None,
        *,
        max_requests: int | None = None,
        window_seconds: float | None = None,
        limit: int | None = None,
    ) -> None:
        """Change the limit at runtime for the whole fleet (persisted in Redis)."""
        new = {"gcra": (rate, burst), "concurrency": (limit, None)}.get(
            self.limit.kind, (max_requests, window_seconds)
        )
        pairs = zip(("p1", "p2"), new, strict=True)
        mapping: dict[Any, Any] = {k: v for k, v in pairs if v is not None}
        if mapping:
            self.store.call("rate limit set", lambda c: c.hset(self.keys[1], mapping=mapping))
            log.info("rate_limit_changed", limit=self.limit.name, **mapping)

    def current(self) -> RateLimit:
        """The limit as the fleet applies it now: its policy with the runtime overrides of
        :meth:`set_rate` (cleared by :meth:`reset`)."""
        raw = self.store.call("rate limit read", lambda c: c.hmget(self.keys[1], "p1", "p2"))
        fields = {"gcra": ("rate", "burst"), "concurrency": ("limit", "lease_seconds")}.get(
            self.limit.kind, ("max_requests", "window_seconds")
        )
        changes: dict[str, Any] = {
            name: int(float(value)) if name in COUNT_FIELDS else float(value)
            for name, value in zip(fields, raw, strict=True)
            if value is not None
        }
        return replace(self.limit, **changes)

    def reset(self) -> None:
        """Forget usage and runtime overrides: the limit starts full."""
        key, cfg = self.keys

        def _reset(c: Any) -> None:
            doomed = [key, cfg, *c.scan_iter(match=f"{key}:*", count=1000)]
            c.delete(*doomed)

        self.store.call("rate limit reset", _reset)
