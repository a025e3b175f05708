"""Idempotency keys by name and arguments: seed 000's check/clear, seed 002's generator.

:func:`check_idempotency` and :func:`clear_idempotency` find the key a call *would* use
— a ``ReliableTask``'s exactly as its pipeline derives it, or an ``@idempotent``
function's — from the task or function name and the call's arguments; they build it with
:mod:`reliability.idempotency`'s own ``bind_arguments``, ``fingerprint`` and ``derive_key``,
so the two cannot drift. :func:`generate_idempotency_key` makes a deterministic key for a
producer's ``idempotency_key`` header.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import inspect
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from celery import current_app

from reliability.idempotency import bind_arguments, derive_key, fingerprint, keyed
from reliability.idempotency_store import IdempotencyStore
from reliability.idempotent import idempotent_function, resolve_store
from reliability.task import ReliableTask


def check_idempotency(name: str, /, *args: Any, **kwargs: Any) -> bool:
    """True when calling task or ``@idempotent`` function ``name`` with these arguments
    would not run now: its key completed within its TTL, or runs under a live lease.

    Seed 000's pre-flight check: one read, no lease taken. ``name`` is a task name
    (``payments.charge``) or an ``@idempotent`` function's name; pass the arguments the
    call takes. A plain call, not a coroutine: in async code call it without ``await``.
    """
    ids, redis_key = locate(name, args, kwargs)
    return ids.status(redis_key) != "free"


def clear_idempotency(name: str, /, *args: Any, **kwargs: Any) -> bool:
    """Forget the key of ``name(*args, **kwargs)`` so the next call runs again (admin; use
    with caution: a completed effect may then happen twice). True if the key existed."""
    ids, redis_key = locate(name, args, kwargs)
    return ids.clear(redis_key)


def locate(
    name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[IdempotencyStore, str]:
    """The store and Redis key of the call ``name(*args, **kwargs)``.

    An ``@idempotent`` function's key, or a keyed ``ReliableTask``'s in the current Celery
    app (``worker.app`` in the service): its signature binding, ``idempotency_key_args``
    and hash tag, in the runtime's store. Raises :class:`LookupError` for an unknown or
    ambiguous name, :class:`TypeError` for arguments the call would not accept, and
    :class:`ValueError` for a task only a producer's header keys.
    """
    function = idempotent_function(name)
    task = current_app.tasks.get(name)
    if function is not None and isinstance(task, ReliableTask):
        raise LookupError(f"{name!r} names both a task and an @idempotent function")
    if function is not None:
        _check_binds(name, function.signature, args, kwargs)
        ids, redis_key, _ = function.locate(args, kwargs)
        return ids, redis_key
    if not isinstance(task, ReliableTask):
        raise LookupError(f"no reliable task or @idempotent function named {name!r}")
    spec = task.spec
    if not keyed(spec.options):
        raise ValueError(
            f"task {name} is not keyed by its arguments (no idempotent=True or"
            " idempotency_key_args): only a producer's idempotency_key keys it"
        )
    _check_binds(name, spec.signature, args, kwargs)
    arguments = bind_arguments(spec.signature, args, kwargs)
    key = derive_key(
        task.name,
        arguments,
        key_args=spec.option("idempotency_key_args", ()),
        fp=fingerprint(arguments),
    )
    ids = IdempotencyStore(resolve_store(None))
    return ids, ids.redis_key(key, spec.tag)


def _check_binds(
    name: str, signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> None:
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"arguments do not fit {name}{signature}: {exc}") from None


def _key_part(value: Any) -> Any:
    """JSON for the few non-JSON types whose text is stable; anything else is refused."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(
        f"cannot key on a {type(value).__name__}: use str, int, float, bool, None,"
        " lists, dicts, datetime, Decimal, UUID or Enum values"
    )


def generate_idempotency_key(*parts: Any, **named: Any) -> str:
    """A deterministic key from an operation's parameters (seed 002): 64 hex digits.

    ``generate_idempotency_key("create_payment", user_id, amount, currency)`` is the same
    in every process and run (keyword order does not matter), e.g. for a producer's
    ``idempotency_key`` header. Values are JSON types or datetime, Decimal, UUID and Enum;
    anything else (whose ``str`` could differ between processes) is a :class:`TypeError`.
    """
    if not parts and not named:
        raise ValueError("generate_idempotency_key needs at least one part")
    try:
        text = json.dumps(
            [list(parts), named],
            sort_keys=True,
            separators=(",", ":"),
            default=_key_part,
            allow_nan=False,
        )
    except ValueError as exc:
        raise ValueError(f"cannot key on a non-finite number: {exc}") from None
    return hashlib.sha256(text.encode()).hexdigest()
