"""The idempotency state machine for plain code (and admin tools), outside tasks.

The same Redis state as inside tasks (``lua/idempotency.lua``): a key is *running*
under a lease with an owner token and a fencing number, *done* with its stored result,
or *released* after a failure. :meth:`IdempotencyStore.run_once` runs a sync or async
callable once per key; :func:`~reliability.idempotent.idempotent` and
:class:`~reliability.effects.SideEffectWrapper` are built on it.
"""

from __future__ import annotations

import json
import types
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast, overload

import structlog

from reliability import scripts
from reliability.callables import is_async_callable, refuse_awaitable
from reliability.errors import IdempotencyConflict, ReliabilityError
from reliability.idempotency import RELEASE, RENEW, canonical
from reliability.store import Store

R = TypeVar("R")
log = structlog.get_logger("reliability.idempotency")

# Effects of the side-effect wrapper are remembered 72 hours unless told otherwise.
DEFAULT_EFFECT_TTL_SECONDS = 72 * 3600
# Leases of plain-code callers (not tasks, which use the settings) last this long.
DEFAULT_LEASE_SECONDS = 60.0
# What a repeated call returns under ``@idempotent(mark_duplicates=True)`` (seed 000).
DUPLICATE_MARKER: Mapping[str, Any] = types.MappingProxyType(
    {"skipped": True, "reason": "idempotent_duplicate"}
)


class InProgress(ReliabilityError):
    """Another holder is running this key right now; try again after ``retry_after``."""

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(f"idempotency key {key!r} is in progress elsewhere")
        self.retry_after = retry_after


_ACQUIRE = scripts.compose(
    "idempotency",
    body="""
local v, d = idem_check(KEYS[1], ARGV[2])
if v then return {v, d or ''} end
return {'run', tostring(idem_acquire(KEYS[1], KEYS[2], ARGV[2], ARGV[3], tonumber(ARGV[4]),
                                     tonumber(ARGV[5]), ARGV[6], ''))}
""",
)
_COMPLETE = scripts.compose(
    "idempotency",
    body="return idem_complete(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))",
)
# KEYS idem   ARGV now: 'done', 'running' (under a live lease) or 'free'; reads only.
_STATUS = scripts.compose(
    body="""
local h = redis.call('HMGET', KEYS[1], 'state', 'until')
if h[1] == 'done' then return 'done' end
if h[1] == 'running' and tonumber(h[2] or '0') > now then return 'running' end
return 'free'
"""
)


@dataclass
class Lease:
    """A held key: the owner token and fencing number to present downstream."""

    key: str
    owner: str
    fence: int


class IdempotencyStore:
    """The idempotency state machine for code outside tasks (and admin tools).

    Logs ``idempotency_lock_acquired`` when it takes a lease, ``task_skipped_idempotent``
    when a completed key returns its stored result instead of running, and
    ``idempotency_lock_released_on_error`` when a failed call frees its key (seed 000).
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def redis_key(self, key: str, tag: str = "fn") -> str:
        return self.store.keys.idem(tag, key)

    def state(self, redis_key: str) -> dict[str, str]:
        """The raw state hash (empty when the key is unknown): check without locking."""

        def read(client: Any) -> dict[str, str]:
            return cast("dict[str, str]", client.hgetall(redis_key))

        found: dict[str, str] = self.store.call("idempotency check", read)
        return found

    def status(self, redis_key: str) -> str:
        """``done``, ``running`` (under a live lease, on Redis time) or ``free`` (unknown,
        released after a failure, or a lapsed lease): whether a call would run now."""
        return str(self.store.run(_STATUS, [redis_key], [""], "idempotency status"))

    def is_done(self, redis_key: str) -> bool:
        return self.state(redis_key).get("state") == "done"

    def clear(self, redis_key: str) -> bool:
        """Forget a key (admin): the next delivery runs again. True if it existed."""
        return bool(self.store.call("idempotency clear", lambda c: c.delete(redis_key)))

    def acquire(
        self,
        redis_key: str,
        fp: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        ttl_seconds: int = DEFAULT_EFFECT_TTL_SECONDS,
        now: float | None = None,
    ) -> tuple[str, Any]:
        """``('run', Lease)``, ``('done', result)``, or raises on conflict / in progress."""
        owner = uuid.uuid4().hex
        reply = self.store.run(
            _ACQUIRE,
            [redis_key, self.store.keys.leases],
            ["" if now is None else now, fp, owner, lease_seconds, ttl_seconds, owner],
            "idempotency acquire",
        )
        decision, detail = str(reply[0]), reply[1]
        if decision == "run":
            log.info("idempotency_lock_acquired", idempotency_key=redis_key, fence=int(detail))
            return "run", Lease(redis_key, owner, int(detail))
        if decision == "done":
            return "done", json.loads(detail) if detail else None
        if decision == "busy":
            raise InProgress(redis_key, float(detail))
        raise IdempotencyConflict(f"{redis_key}: same key, different arguments ({detail})")

    def complete(
        self, lease: Lease, result: Any, ttl_seconds: int, now: float | None = None
    ) -> bool:
        """Record the result; False when a successor holds a newer fence (stale holder)."""
        return bool(
            self.store.run(
                _COMPLETE,
                [lease.key, self.store.keys.leases],
                [
                    "" if now is None else now,
                    lease.owner,
                    str(lease.fence),
                    canonical(result),
                    ttl_seconds,
                ],
                "idempotency complete",
            )
        )

    def release(self, lease: Lease, now: float | None = None) -> bool:
        return bool(
            self.store.run(
                RELEASE,
                [lease.key, self.store.keys.leases],
                ["" if now is None else now, lease.owner, str(lease.fence)],
                "idempotency release",
            )
        )

    def renew(self, lease: Lease, lease_seconds: float, now: float | None = None) -> bool:
        return bool(
            self.store.run(
                RENEW,
                [lease.key, self.store.keys.leases],
                ["" if now is None else now, lease.owner, str(lease.fence), lease_seconds],
                "idempotency renew",
            )
        )

    @overload
    def run_once(  # type: ignore[overload-overlap]
        self,
        redis_key: str,
        fp: str,
        fn: Callable[[Lease], Awaitable[R]],
        *,
        ttl_seconds: int = ...,
        lease_seconds: float = ...,
    ) -> Awaitable[tuple[bool, R]]: ...

    @overload
    def run_once(
        self,
        redis_key: str,
        fp: str,
        fn: Callable[[Lease], R],
        *,
        ttl_seconds: int = ...,
        lease_seconds: float = ...,
    ) -> tuple[bool, R]: ...

    def run_once(
        self,
        redis_key: str,
        fp: str,
        fn: Callable[[Lease], Any],
        *,
        ttl_seconds: int = DEFAULT_EFFECT_TTL_SECONDS,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> Any:
        """Run ``fn(lease)`` unless the key is done: ``(executed, result)``; failures release.

        A coroutine function gets an awaitable back that takes the lease, awaits ``fn``
        and stores the awaited result (a done key is still returned through the await).
        A plain function that returns an awaitable is refused with
        :class:`~reliability.callables.AwaitableReturned` and its lease released.
        """
        if is_async_callable(fn):
            return self._run_once_async(redis_key, fp, fn, ttl_seconds, lease_seconds)
        lease, stored = self._begin(redis_key, fp, ttl_seconds, lease_seconds)
        if lease is None:
            return False, stored
        try:
            result = fn(lease)
            refuse_awaitable(result, fn, "IdempotencyStore.run_once")
        except BaseException as exc:
            self._released_on_error(lease, exc)
            raise
        self.complete(lease, result, ttl_seconds)
        return True, result

    async def _run_once_async(
        self,
        redis_key: str,
        fp: str,
        fn: Callable[[Lease], Awaitable[R]],
        ttl_seconds: int,
        lease_seconds: float,
    ) -> tuple[bool, R]:
        lease, stored = self._begin(redis_key, fp, ttl_seconds, lease_seconds)
        if lease is None:
            return False, stored
        try:
            result = await fn(lease)
        except BaseException as exc:  # cancellation too: the key must not stay taken
            self._released_on_error(lease, exc)
            raise
        self.complete(lease, result, ttl_seconds)
        return True, result

    def _begin(
        self, redis_key: str, fp: str, ttl_seconds: int, lease_seconds: float
    ) -> tuple[Lease | None, Any]:
        """(lease, None) to run, or (None, stored result) when the key is done."""
        decision, value = self.acquire(
            redis_key, fp, lease_seconds=lease_seconds, ttl_seconds=ttl_seconds
        )
        if decision == "done":
            log.info("task_skipped_idempotent", idempotency_key=redis_key)
            return None, value
        return value, None

    def _released_on_error(self, lease: Lease, exc: BaseException) -> None:
        self.release(lease)
        log.info(
            "idempotency_lock_released_on_error",
            idempotency_key=lease.key,
            error=type(exc).__name__,
        )
