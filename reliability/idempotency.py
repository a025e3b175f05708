"""Idempotency: one effect per key, fleet-wide.

A key is in one of three states in Redis (see ``lua/idempotency.lua``): *running* under
a lease with an owner token and a fencing number, *done* with its stored result, or
*released* after a failure so a retry may run. Inside tasks the check and the lease are
part of the admission script; this module also offers the same state machine to plain
code: :class:`IdempotencyStore`, :func:`idempotent`, and :class:`SideEffectWrapper`
(seed 004's ``effect:{type}:{entity_id}``), for sync and async callables alike. Keys by
task or function name (seed 000, 002) are in :mod:`reliability.idempotency_keys`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import types
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import structlog

from reliability import scripts
from reliability.admission import Fragment
from reliability.callables import describe, is_async_callable, refuse_awaitable
from reliability.errors import ConfigurationError, IdempotencyConflict, ReliabilityError
from reliability.security import key_token
from reliability.store import Store

R = TypeVar("R")
log = structlog.get_logger("reliability.idempotency")

# Effects of the side-effect wrapper are remembered 72 hours unless told otherwise.
DEFAULT_EFFECT_TTL_SECONDS = 72 * 3600
# Leases of plain-code callers (not tasks, which use the settings) last this long.
DEFAULT_LEASE_SECONDS = 60.0
# What a repeated call returns under ``@idempotent(mark_duplicates=True)`` (seed 000).
DUPLICATE_MARKER: Mapping[str, Any] = types.MappingProxyType(
    {"skipped": True, "reason": "idempotent_duplicate"})


class InProgress(ReliabilityError):
    """Another holder is running this key right now; try again after ``retry_after``."""

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(f"idempotency key {key!r} is in progress elsewhere")
        self.retry_after = retry_after


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, so equal arguments hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(arguments: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(arguments).encode()).hexdigest()


def bind_arguments(signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """Arguments by parameter name, so positional and keyword calls key alike."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {"args": list(args), "kwargs": dict(kwargs)}
    bound.apply_defaults()
    return dict(bound.arguments)


def derive_key(
    name: str,
    arguments: Mapping[str, Any],
    header: str | None = None,
    key_args: Sequence[str] = (),
    fp: str | None = None,
) -> str:
    """The idempotency key: the producer's header, else declared arguments, else a hash.

    Keys are namespaced by task name, so two tasks never share one by accident, and are
    deterministic: the same arguments always give the same key. A key is part of a Redis
    key name (and logged, and sent downstream as ``Idempotency-Key``), so it never
    embeds argument values: ``name:args:<sha256>`` hashes the declared arguments (each
    as text, so ``1`` and ``"1"`` key alike, as a producer's id may arrive either way),
    ``name:sha256:<fp>`` all of them. A producer's header stays readable when short and
    of a safe charset (``name:order-42``), else ``name:sha256=<hex>``. ``fp`` is the
    arguments' fingerprint when the caller has it already.
    """
    if header:
        return f"{name}:{key_token(header)}"
    if key_args:
        text = ",".join(f"{a}={arguments.get(a)}" for a in key_args)
        return f"{name}:args:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"
    return f"{name}:sha256:{fp or fingerprint(arguments)}"


# Admission fragment. KEYS idem, leases; ARGV fingerprint, owner, lease_s, ttl_s, tag.
FRAGMENT = Fragment(
    name="idempotency",
    libraries=("idempotency",),
    nkeys=2,
    nargs=5,
    check="""
local iv, idd = idem_check($K1, $A1)
if iv == 'done' then
  settle('skipped', '')
  return {'done', idd}
end
if iv then return {iv, idd} end
""",
    commit="fence = idem_acquire($K1, $K2, $A1, $A2, tonumber($A3), tonumber($A4), ARGV[3], $A5)",
)

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
""",
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
        return self.store.call("idempotency check", lambda c: c.hgetall(redis_key))

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

    def complete(self, lease: Lease, result: Any, ttl_seconds: int, now: float | None = None
                 ) -> bool:
        """Record the result; False when a successor holds a newer fence (stale holder)."""
        return bool(
            self.store.run(
                _COMPLETE,
                [lease.key, self.store.keys.leases],
                ["" if now is None else now, lease.owner, str(lease.fence), canonical(result),
                 ttl_seconds],
                "idempotency complete",
            )
        )

    def release(self, lease: Lease, now: float | None = None) -> bool:
        return bool(
            self.store.run(
                scripts.RELEASE,
                [lease.key, self.store.keys.leases],
                ["" if now is None else now, lease.owner, str(lease.fence)],
                "idempotency release",
            )
        )

    def renew(self, lease: Lease, lease_seconds: float, now: float | None = None) -> bool:
        return bool(
            self.store.run(
                scripts.RENEW,
                [lease.key, self.store.keys.leases],
                ["" if now is None else now, lease.owner, str(lease.fence), lease_seconds],
                "idempotency renew",
            )
        )

    @overload
    def run_once(  # type: ignore[overload-overlap]
        self, redis_key: str, fp: str, fn: Callable[[Lease], Awaitable[R]], *,
        ttl_seconds: int = ..., lease_seconds: float = ...,
    ) -> Awaitable[tuple[bool, R]]: ...

    @overload
    def run_once(
        self, redis_key: str, fp: str, fn: Callable[[Lease], R], *,
        ttl_seconds: int = ..., lease_seconds: float = ...,
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

    async def _run_once_async(self, redis_key: str, fp: str,
                              fn: Callable[[Lease], Awaitable[R]], ttl_seconds: int,
                              lease_seconds: float) -> tuple[bool, R]:
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

    def _begin(self, redis_key: str, fp: str, ttl_seconds: int, lease_seconds: float
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
        log.info("idempotency_lock_released_on_error", idempotency_key=lease.key,
                 error=type(exc).__name__)


@dataclass(frozen=True)
class IdempotentFunction:
    """An ``@idempotent`` function as :func:`check_idempotency` finds it: how its key is made."""

    name: str  # the key's namespace: module.qualname unless given
    signature: inspect.Signature
    key_args: tuple[str, ...]
    store: Store | Callable[[], Store] | None

    def locate(self, args: Sequence[Any], kwargs: Mapping[str, Any]
               ) -> tuple[IdempotencyStore, str, str]:
        """(store, Redis key, fingerprint) of a call with these arguments."""
        arguments = bind_arguments(self.signature, args, kwargs)
        fp = fingerprint(arguments)
        ids = IdempotencyStore(resolve_store(self.store))
        key = derive_key(self.name, arguments, key_args=self.key_args, fp=fp)
        return ids, ids.redis_key(key), fp


# @idempotent functions by name (the short name and module.qualname, or the given name);
# None marks a short name that two different functions share.
_FUNCTIONS: dict[str, IdempotentFunction | None] = {}


def idempotent_function(name: str) -> IdempotentFunction | None:
    """The ``@idempotent`` function registered as ``name``, None if there is none;
    :class:`LookupError` when two functions share that short name."""
    found = _FUNCTIONS.get(name)
    if found is None and name in _FUNCTIONS:
        raise LookupError(f"several @idempotent functions are named {name!r}: use the"
                          " module.qualname name or @idempotent(name=...)")
    return found


def _register(fn: Callable[..., Any], found: IdempotentFunction, explicit: bool) -> None:
    """Under its key namespace (the latest definition wins) and, unless named explicitly,
    its short name; a short name never displaces another function's namespace name."""
    _FUNCTIONS[found.name] = found
    short = fn.__name__
    if explicit or short == found.name:
        return
    known = _FUNCTIONS.get(short, found)
    if known is not None and known.name != short:
        _FUNCTIONS[short] = found if known.name == found.name else None


def idempotent(
    ttl: int = DEFAULT_EFFECT_TTL_SECONDS,
    *,
    store: Store | Callable[[], Store] | None = None,
    key_args: Sequence[str] = (),
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    name: str | None = None,
    mark_duplicates: bool = False,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Run a plain function at most once per key within ``ttl`` seconds, fleet-wide.

    Works on ``def`` and ``async def`` functions alike (an async one is awaited before
    its result is stored). A repeated call returns the stored result without running,
    or with ``mark_duplicates=True`` the marker ``{"skipped": True, "reason":
    "idempotent_duplicate"}`` (seed 000). The key comes from ``key_args`` or from all
    arguments, namespaced by ``name`` (default ``module.qualname``);
    ``check_idempotency`` finds the function by that name or by its short name.
    ``store`` defaults to the worker's runtime store.
    """

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(fn)
        params = signature.parameters
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [a for a in key_args if a not in params]
        if missing and not open_kwargs:
            raise ConfigurationError(
                f"@idempotent {describe(fn)}: key_args {missing} are not parameters")
        found = IdempotentFunction(name or f"{fn.__module__}.{fn.__qualname__}", signature,
                                   tuple(key_args), store)
        _register(fn, found, name is not None)

        def answer(executed: bool, result: Any) -> Any:
            return result if executed or not mark_duplicates else dict(DUPLICATE_MARKER)

        if is_async_callable(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                ids, redis_key, fp = found.locate(args, kwargs)

                async def body(_lease: Lease) -> Any:
                    return await fn(*args, **kwargs)  # type: ignore[misc]

                return answer(*await ids.run_once(
                    redis_key, fp, body, ttl_seconds=ttl, lease_seconds=lease_seconds))

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ids, redis_key, fp = found.locate(args, kwargs)

            def body(_lease: Lease) -> Any:
                result = fn(*args, **kwargs)
                refuse_awaitable(result, fn, "@idempotent")
                return result

            return answer(*ids.run_once(
                redis_key, fp, body, ttl_seconds=ttl, lease_seconds=lease_seconds))

        return wrapper

    return decorate


def resolve_store(store: Store | Callable[[], Store] | None) -> Store:
    """A store, a callable returning one, or (None) the worker's runtime store."""
    if isinstance(store, Store):
        return store
    if callable(store):
        return store()
    from reliability.runtime import get_runtime

    return get_runtime().store


class SideEffectWrapper:
    """Exactly-once side effects keyed ``effect:{type}:{entity_id}`` (seed 004).

    Seed 004's effect types and ``wrap_*`` helpers are in :mod:`reliability.effects`.
    """

    def __init__(self, store: Store, ttl_seconds: int = DEFAULT_EFFECT_TTL_SECONDS) -> None:
        self.ids = IdempotencyStore(store)
        self.ttl_seconds = ttl_seconds

    def key(self, effect_type: str, entity_id: str) -> str:
        # seed 004's effect:{type}:{entity_id}; an unsafe id is hashed (never raw input in
        # a key name).
        return (f"{self.ids.store.keys.prefix}:effect:{key_token(str(effect_type))}:"
                f"{key_token(entity_id)}")

    def run(
        self,
        effect_type: str,
        entity_id: str,
        fn: Callable[..., Any],
        *args: Any,
        ttl_seconds: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """``(executed, result)``: False with the cached result when already done.

        For a coroutine function, an awaitable of that pair (``fn`` is awaited before its
        result is stored).
        """
        effect_type, entity_id = str(effect_type), str(entity_id)
        if not effect_type or not entity_id:
            raise ValueError("a side effect needs a non-empty effect type and entity id")
        key = self.key(effect_type, entity_id)
        fp = fingerprint({"args": list(args), "kwargs": kwargs})
        ttl = ttl_seconds or self.ttl_seconds
        if is_async_callable(fn):
            async def body(_lease: Lease) -> Any:
                return await fn(*args, **kwargs)

            return self.ids.run_once(key, fp, body, ttl_seconds=ttl)

        def call(_lease: Lease) -> Any:
            result = fn(*args, **kwargs)
            refuse_awaitable(result, fn, "SideEffectWrapper.run")
            return result

        return self.ids.run_once(key, fp, call, ttl_seconds=ttl)
