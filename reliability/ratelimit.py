"""Rate limits the whole fleet obeys as one client, on Redis time.

Celery's ``rate_limit`` is per worker and holds prefetch slots while it waits. Here a
limit lives in Redis (``lua/ratelimit.lua``) and is checked inside the admission script:

* ``gcra``: a token bucket (``rate`` per second, ``burst``) as GCRA;
* ``sliding``: at most ``max_requests`` in any ``window_seconds`` (a log of admissions);
* ``fixed``: at most ``max_requests`` per aligned window;
* ``concurrency``: at most ``limit`` calls in flight; a holder that dies frees its slot
  after ``lease_seconds``.

Limits are keyed per task, tenant, user, IP or any argument, and a task may declare
several (global -> tenant -> task): all must admit, atomically. Inside a task, no token
means the admission *reserves* the task's future slot and the message is parked until
then — it runs at that time without re-admission and never holds a worker slot while it
waits, and an over-limit tenant's tasks wait outside the broker queue. Outside tasks,
:class:`RateLimiter` offers ``acquire``/``try_acquire``/``set_rate``/``reset``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import structlog

from reliability import metrics, scripts
from reliability.admission import Fragment
from reliability.bucket import LocalTokenBucket
from reliability.errors import BackendUnavailable, ConfigurationError
from reliability.security import hashed_token, key_token
from reliability.store import Store

log = structlog.get_logger("reliability.ratelimit")
Kind = Literal["gcra", "sliding", "fixed", "concurrency"]
# What a limit is keyed by: the task, a header, an argument, or nothing (global).
Scope = str  # "global" | "task" | "tenant" | "user" | "ip" | "arg:<name>"

SCOPE_ARGS = {"user": "user_id", "ip": "ip"}
# RateLimit's whole-number fields (the others are seconds or rates).
_COUNTS = frozenset({"burst", "max_requests", "limit", "cost"})


@dataclass(frozen=True)
class RateLimit:
    """One limit's policy. ``p1``/``p2`` are what the Lua reads for its kind."""

    name: str
    kind: Kind = "gcra"
    rate: float = 10.0  # gcra: tokens per second
    burst: int = 1  # gcra: bucket capacity
    max_requests: int = 100  # sliding / fixed
    window_seconds: float = 60.0  # sliding / fixed
    limit: int = 10  # concurrency
    lease_seconds: float = 300.0  # concurrency: a dead holder frees its slot after this
    per: Scope = "global"
    cost: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("gcra", "sliding", "fixed", "concurrency"):
            raise ConfigurationError(f"rate limit {self.name}: unknown kind {self.kind!r}")
        if self.rate <= 0 or self.burst < 1 or self.max_requests < 1 or self.limit < 1:
            raise ConfigurationError(f"rate limit {self.name}: rates and sizes must be positive")
        if self.window_seconds <= 0 or self.lease_seconds <= 0 or self.cost < 1:
            raise ConfigurationError(f"rate limit {self.name}: windows and cost must be positive")
        most = {"gcra": self.burst, "concurrency": self.limit}.get(self.kind, self.max_requests)
        if self.cost > most:
            raise ConfigurationError(
                f"rate limit {self.name}: cost {self.cost} exceeds what the limit ever admits"
                f" at once ({most}); such a call could never conform")
        if self.per not in ("global", "task", "tenant", "user", "ip") and not self.per.startswith(
                "arg:"):
            raise ConfigurationError(f"rate limit {self.name}: unknown scope {self.per!r}")

    @property
    def params(self) -> tuple[float, float]:
        if self.kind == "gcra":
            return self.rate, self.burst
        if self.kind == "concurrency":
            return self.limit, self.lease_seconds
        return self.max_requests, self.window_seconds

    def scope_key(self, value: str) -> str:
        """A scope value as it appears in the limit's Redis key name.

        Values taken from arguments (``user``, ``ip``, ``arg:<name>``) are always hashed;
        a tenant id stays readable when short and of a safe charset (else hashed); the
        global and task scopes are not input. ``reliable limits reset --scope <value>``
        takes the value itself and goes through here too.
        """
        if self.per in ("global", "task"):
            return value
        if self.per == "tenant":
            token = key_token(value)
            # "cfg" names the limit's runtime overrides (limit_keys): a tenant of that
            # name is hashed instead of sharing the key.
            return hashed_token(value) if token == "cfg" else token
        return hashed_token(value)

    def scope_value(self, task_name: str, tenant: str | None,
                    arguments: Callable[[], dict[str, Any]]) -> str:
        """The value this limit is keyed by for one call."""
        if self.per == "global":
            return "-"
        if self.per == "task":
            return task_name
        if self.per == "tenant":
            return tenant or "-"
        arg = self.per[4:] if self.per.startswith("arg:") else SCOPE_ARGS[self.per]
        return str(arguments().get(arg, "-"))


# Limits the business tasks use, after seed 000's guidance; settings replace them by name.
DEFAULT_LIMITS: dict[str, RateLimit] = {
    "payment-gateway": RateLimit(name="payment-gateway", kind="gcra", rate=10, burst=15),
    "notification-per-user": RateLimit(name="notification-per-user", kind="sliding",
                                       max_requests=5, window_seconds=60, per="user"),
    "analytics-export": RateLimit(name="analytics-export", kind="gcra", rate=2, burst=10),
}


def limit_keys(store: Store, limit: RateLimit, scope: str) -> list[str]:
    """A limit's keys: one per scope value (never embedded verbatim when it comes from
    input: :meth:`RateLimit.scope_key`) plus its runtime overrides, shared by every task
    naming the limit. Hash-tagged by the limit's name: give a limit the name of the
    dependency it protects (as breakers are) and one admission's keys share a slot."""
    base = f"{store.keys.prefix}:{{{limit.name}}}:rl"
    return [f"{base}:{limit.scope_key(scope)}", f"{base}:cfg"]


def fragment(count: int, reserved: bool = False) -> Fragment:
    """The admission fragment for ``count`` limits, checked and reserved together.

    A first delivery reserves the earliest time every limit (and its start gate) allows:
    now, or a future slot the message is parked until. A ``reserved`` copy (parked with
    its slot) only passes the start gate — and takes its concurrency places — when it
    comes back. KEYS per limit: K, O. ARGV: owner, then per limit kind, p1, p2, cost, name.
    """
    head = f"""
local rl_n, rl_kb, rl_ab = {count}, $KB, $AB + 1
local rl_at = now
local rl_p = {{}}
for i = 0, rl_n - 1 do
  local a = rl_ab + 5 * i
  local p1, p2 = rl_params(KEYS[rl_kb + 2 * i + 2], ARGV[a + 2], ARGV[a + 3])
  rl_p[i] = {{ARGV[a + 1], KEYS[rl_kb + 2 * i + 1], p1, p2, tonumber(ARGV[a + 4]), ARGV[a + 5]}}
end
local function rl_earliest_gated(p, t)
  local at = rl_earliest(p[1], p[2], p[3], p[4], p[5], t)
  if at == nil or p[1] == 'concurrency' then return at end
  return rl_gate_free(p[1], p[2], p[3], p[4], p[5], at)
end
local function rl_start_all(reserve)
  for i = 0, rl_n - 1 do
    local p = rl_p[i]
    if reserve or p[1] == 'concurrency' then rl_commit(p[1], p[2], p[3], p[4], p[5], rl_at, $A1) end
    if p[1] ~= 'concurrency' then rl_start(p[1], p[2], p[3], p[4], p[5], $A1) end
  end
end
"""
    if reserved:
        check = head + """
for i = 0, rl_n - 1 do
  local p = rl_p[i]
  local t
  if p[1] == 'concurrency' then t = rl_earliest(p[1], p[2], p[3], p[4], p[5], now)
  else t = rl_gate_free(p[1], p[2], p[3], p[4], p[5], now) end
  if t == nil then return {'limit_busy', '1.000000', p[6]} end
  if t > rl_at then rl_at = t end
end
if rl_at > now then return {'limit_delay', string.format('%.6f', rl_at - now), 'gate'} end
"""
        commit = "rl_start_all(false)"
    else:
        check = head + """
local rl_settled = false
for _ = 1, 8 do
  local moved = false
  for i = 0, rl_n - 1 do
    local t = rl_earliest_gated(rl_p[i], rl_at)
    if t == nil then return {'limit_busy', '1.000000', rl_p[i][6]} end
    if t > rl_at then rl_at = t; moved = true end
  end
  if not moved then rl_settled = true; break end
end
-- No time every limit allows within the search bound: reserve nothing, look again then.
if not rl_settled then return {'limit_busy', string.format('%.6f', rl_at - now)} end
if rl_at > now then
  for i = 0, rl_n - 1 do
    local p = rl_p[i]
    -- Concurrency places are taken by the copy when it runs (rl_start_all), not while
    -- the message is parked: this delivery's owner would never release one.
    if p[1] ~= 'concurrency' then rl_commit(p[1], p[2], p[3], p[4], p[5], rl_at, $A1) end
  end
  return {'limit_delay', string.format('%.6f', rl_at - now)}
end
"""
        commit = "rl_start_all(true)"
    return Fragment(
        name=f"ratelimit x{count}{' reserved' if reserved else ''}",
        libraries=("ratelimit",),
        nkeys=2 * count,
        nargs=1 + 5 * count,
        check=check,
        commit=commit,
    )


_ACQUIRE = scripts.compose("ratelimit", body="""
local p1, p2 = rl_params(KEYS[2], ARGV[3], ARGV[4])
local t = rl_earliest(ARGV[2], KEYS[1], p1, p2, tonumber(ARGV[5]), now)
if t == nil then return {'busy', '1.000000'} end
if t > now and ARGV[7] ~= '1' then return {'wait', string.format('%.6f', t - now)} end
rl_commit(ARGV[2], KEYS[1], p1, p2, tonumber(ARGV[5]), t, ARGV[6])
return {'ok', string.format('%.6f', t - now)}
""")
_RELEASE = scripts.compose("ratelimit", body="return rl_release(KEYS[1], ARGV[2])")
_AVAILABLE = scripts.compose("ratelimit", body="""
local p1, p2 = rl_params(KEYS[2], ARGV[3], ARGV[4])
return string.format('%.6f', rl_available(ARGV[2], KEYS[1], p1, p2))
""")


class RateLimiter:
    """One limit (at one scope value) for code outside tasks.

    ``local_fallback``: a :class:`~reliability.bucket.LocalTokenBucket` used while the
    store is unreachable — inexact (it sees only this process), logged and counted each
    time; without one, an unreachable store raises :class:`BackendUnavailable`.
    """

    def __init__(self, store: Store, limit: RateLimit, scope: str = "-",
                 *, sleep: Callable[[float], None] = time.sleep,
                 local_fallback: LocalTokenBucket | None = None) -> None:
        self.store = store
        self.limit = limit
        self.keys = limit_keys(store, limit, scope)
        self._sleep = sleep
        self.local_fallback = local_fallback

    @classmethod
    def with_local_fallback(cls, store: Store, limit: RateLimit, scope: str = "-", *,
                            share: float = 1.0) -> RateLimiter:
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
            _ACQUIRE, self.keys,
            ["" if now is None else now, self.limit.kind, p1, p2, cost, owner,
             "1" if reserve else "0"], "rate limit")
        return str(verdict), float(wait)

    def _fallback(self, exc: BackendUnavailable) -> LocalTokenBucket:
        if self.local_fallback is None:
            raise exc
        metrics.STORE_UNAVAILABLE.labels("rate limit").inc()
        log.warning("rate_limit_local_fallback", limit=self.limit.name, error=str(exc))
        return self.local_fallback

    def try_acquire(self, tokens: int = 1, now: float | None = None,
                    owner: str | None = None) -> bool:
        """Take ``tokens`` now if the fleet-wide limit allows; never waits.

        For a concurrency limit pass ``owner`` and :meth:`release` it (or use :meth:`hold`).
        """
        try:
            verdict, _ = self._run(tokens, owner or f"try:{time.monotonic_ns()}", False, now)
        except BackendUnavailable as exc:
            return self._fallback(exc).try_acquire(tokens)
        return verdict == "ok"

    def acquire(self, tokens: int = 1, timeout: float | None = None,
                owner: str | None = None) -> bool:
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
        return float(self.store.run(_AVAILABLE, self.keys,
                                    ["", self.limit.kind, p1, p2], "rate limit read"))

    def set_rate(self, rate: float | None = None, burst: int | None = None, *,
                 max_requests: int | None = None, window_seconds: float | None = None,
                 limit: int | None = None) -> None:
        """Change the limit at runtime for the whole fleet (persisted in Redis)."""
        new = {"gcra": (rate, burst), "concurrency": (limit, None)}.get(
            self.limit.kind, (max_requests, window_seconds))
        mapping = {k: v for k, v in zip(("p1", "p2"), new, strict=True) if v is not None}
        if mapping:
            self.store.call("rate limit set", lambda c: c.hset(self.keys[1], mapping=mapping))
            log.info("rate_limit_changed", limit=self.limit.name, **mapping)

    def current(self) -> RateLimit:
        """The limit as the fleet applies it now: its policy with the runtime overrides of
        :meth:`set_rate` (cleared by :meth:`reset`)."""
        raw = self.store.call("rate limit read", lambda c: c.hmget(self.keys[1], "p1", "p2"))
        fields = {"gcra": ("rate", "burst"), "concurrency": ("limit", "lease_seconds")}.get(
            self.limit.kind, ("max_requests", "window_seconds"))
        changes = {name: int(float(value)) if name in _COUNTS else float(value)
                   for name, value in zip(fields, raw, strict=True) if value is not None}
        return replace(self.limit, **changes)

    def reset(self) -> None:
        """Forget usage and runtime overrides: the limit starts full."""
        key, cfg = self.keys

        def _reset(c: Any) -> None:
            doomed = [key, cfg, *c.scan_iter(match=f"{key}:*", count=1000)]
            c.delete(*doomed)

        self.store.call("rate limit reset", _reset)


def admission_args(store: Store, task_name: str, limits: Sequence[RateLimit],
                   owner: str, tenant: str | None, arguments: Callable[[], dict[str, Any]]
                   ) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of :func:`fragment` for one delivery."""
    keys: list[str] = []
    args: list[Any] = [owner]
    for limit in limits:
        keys.extend(limit_keys(store, limit, limit.scope_value(task_name, tenant, arguments)))
        p1, p2 = limit.params
        args.extend([limit.kind, p1, p2, limit.cost, limit.name])
    return keys, args
