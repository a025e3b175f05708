"""Idempotency: one effect per key, fleet-wide.

A key is in one of three states in Redis (see ``lua/idempotency.lua``): *running* under
a lease with an owner token and a fencing number, *done* with its stored result, or
*released* after a failure so a retry may run. Inside tasks the check and the lease are
part of the admission script; this module also offers the same state machine to plain
code: :class:`IdempotencyStore`, :func:`idempotent`, and :class:`SideEffectWrapper`
(seed 004's ``effect:{type}:{entity_id}``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from reliability import scripts
from reliability.admission import Fragment
from reliability.errors import IdempotencyConflict, ReliabilityError
from reliability.security import key_token
from reliability.store import Store

R = TypeVar("R")

# Effects of the side-effect wrapper are remembered 72 hours unless told otherwise.
DEFAULT_EFFECT_TTL_SECONDS = 72 * 3600
# Leases of plain-code callers (not tasks, which use the settings) last this long.
DEFAULT_LEASE_SECONDS = 60.0


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


@dataclass
class Lease:
    """A held key: the owner token and fencing number to present downstream."""

    key: str
    owner: str
    fence: int


class IdempotencyStore:
    """The idempotency state machine for code outside tasks (and admin tools)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def redis_key(self, key: str, tag: str = "fn") -> str:
        return self.store.keys.idem(tag, key)

    def state(self, redis_key: str) -> dict[str, str]:
        """The raw state hash (empty when the key is unknown): check without locking."""
        return self.store.call("idempotency check", lambda c: c.hgetall(redis_key))

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

    def run_once(
        self,
        redis_key: str,
        fp: str,
        fn: Callable[[Lease], R],
        *,
        ttl_seconds: int = DEFAULT_EFFECT_TTL_SECONDS,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> tuple[bool, R]:
        """Run ``fn`` unless the key is done: ``(executed, result)``; failures release."""
        decision, value = self.acquire(
            redis_key, fp, lease_seconds=lease_seconds, ttl_seconds=ttl_seconds
        )
        if decision == "done":
            return False, value
        lease: Lease = value
        try:
            result = fn(lease)
        except BaseException:
            self.release(lease)
            raise
        self.complete(lease, result, ttl_seconds)
        return True, result


def idempotent(
    ttl: int = DEFAULT_EFFECT_TTL_SECONDS,
    *,
    store: Store | Callable[[], Store] | None = None,
    key_args: Sequence[str] = (),
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Run a plain function at most once per key within ``ttl`` seconds, fleet-wide.

    A repeated call returns the stored result without running. The key comes from
    ``key_args`` or from all arguments. ``store`` defaults to the worker's runtime store.
    """

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(fn)
        name = f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            arguments = bind_arguments(signature, args, kwargs)
            ids = IdempotencyStore(_resolve(store))
            redis_key = ids.redis_key(derive_key(name, arguments, key_args=key_args))
            _, result = ids.run_once(
                redis_key, fingerprint(arguments), lambda _lease: fn(*args, **kwargs),
                ttl_seconds=ttl, lease_seconds=lease_seconds,
            )
            return result

        return wrapper

    return decorate


def _resolve(store: Store | Callable[[], Store] | None) -> Store:
    if isinstance(store, Store):
        return store
    if callable(store):
        return store()
    from reliability.runtime import get_runtime

    return get_runtime().store


class SideEffectWrapper:
    """Exactly-once side effects keyed ``effect:{type}:{entity_id}`` (seed 004)."""

    def __init__(self, store: Store, ttl_seconds: int = DEFAULT_EFFECT_TTL_SECONDS) -> None:
        self.ids = IdempotencyStore(store)
        self.ttl_seconds = ttl_seconds

    def key(self, effect_type: str, entity_id: str) -> str:
        return f"{self.ids.store.keys.prefix}:effect:{effect_type}:{entity_id}"

    def run(
        self,
        effect_type: str,
        entity_id: str,
        fn: Callable[..., R],
        *args: Any,
        ttl_seconds: int | None = None,
        **kwargs: Any,
    ) -> tuple[bool, R]:
        """``(executed, result)``: False with the cached result when already done."""
        return self.ids.run_once(
            self.key(effect_type, str(entity_id)),
            fingerprint({"args": list(args), "kwargs": kwargs}),
            lambda _lease: fn(*args, **kwargs),
            ttl_seconds=ttl_seconds or self.ttl_seconds,
        )
