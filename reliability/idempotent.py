"""``@idempotent``: a plain function runs once per arguments, fleet-wide (seed 000).

Functions are registered under their name so :func:`~reliability.idempotency_keys.check_idempotency`
finds their keys by name and arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from reliability.callables import describe, is_async_callable, refuse_awaitable
from reliability.errors import ConfigurationError
from reliability.idempotency import bind_arguments, derive_key, fingerprint
from reliability.idempotency_store import (
    DEFAULT_EFFECT_TTL_SECONDS,
    DEFAULT_LEASE_SECONDS,
    DUPLICATE_MARKER,
    IdempotencyStore,
    Lease,
)
from reliability.runtime import get_runtime
from reliability.store import Store

R = TypeVar("R")


@dataclass(frozen=True)
class IdempotentFunction:
    """An ``@idempotent`` function as :func:`check_idempotency` finds it: how its key is made."""

    name: str  # the key's namespace: module.qualname unless given
    signature: inspect.Signature
    key_args: tuple[str, ...]
    store: Store | Callable[[], Store] | None

    def locate(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
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
        raise LookupError(
            f"several @idempotent functions are named {name!r}: use the"
            " module.qualname name or @idempotent(name=...)"
        )
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
                f"@idempotent {describe(fn)}: key_args {missing} are not parameters"
            )
        found = IdempotentFunction(
            name or f"{fn.__module__}.{fn.__qualname__}", signature, tuple(key_args), store
        )
        _register(fn, found, name is not None)

        def answer(executed: bool, result: Any) -> Any:
            return result if executed or not mark_duplicates else dict(DUPLICATE_MARKER)

        if is_async_callable(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                ids, redis_key, fp = found.locate(args, kwargs)

                async def body(_lease: Lease) -> Any:
                    return await fn(*args, **kwargs)  # type: ignore[misc]

                return answer(
                    *await ids.run_once(
                        redis_key, fp, body, ttl_seconds=ttl, lease_seconds=lease_seconds
                    )
                )

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ids, redis_key, fp = found.locate(args, kwargs)

            def body(_lease: Lease) -> Any:
                result = fn(*args, **kwargs)
                refuse_awaitable(result, fn, "@idempotent")
                return result

            return answer(
                *ids.run_once(redis_key, fp, body, ttl_seconds=ttl, lease_seconds=lease_seconds)
            )

        return wrapper

    return decorate


def resolve_store(store: Store | Callable[[], Store] | None) -> Store:
    """A store, a callable returning one, or (None) the worker's runtime store."""
    if isinstance(store, Store):
        return store
    if callable(store):
        return store()
    return get_runtime().store
