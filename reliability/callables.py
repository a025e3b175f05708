"""Sync and async callables, told apart the same way everywhere the library accepts one.

The breaker, ``@idempotent``, :meth:`IdempotencyStore.run_once`, :class:`SideEffectWrapper`
and :class:`RetryPolicy` must know *before* the call whether to await it: a breaker records
the outcome after the await, an idempotency key stores the awaited value, a retry waits
between awaited attempts. A callable is async when calling it is ``async def``: a coroutine
function, a bound async method, a ``functools.partial`` of one, or an object whose
``__call__`` is ``async def``. A plain callable that returns an awaitable anyway
(``lambda: fetch(url)``) is refused with :class:`AwaitableReturned`: taking it for a result
would record an unawaited coroutine as a success, or store its repr as the result.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


class AwaitableReturned(TypeError):
    """A callable taken for sync returned an awaitable: a programming error, never an outcome.

    Breakers record it as neither success nor failure and retry policies never retry it.
    """


def is_async_callable(fn: Any) -> bool:
    """True when calling ``fn`` runs ``async def`` code (so its result must be awaited)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    # An object whose __call__ is ``async def`` (a class's own __call__ is type.__call__).
    return callable(fn) and inspect.iscoroutinefunction(type(fn).__call__)


def describe(fn: Any) -> str:
    """A callable's qualified name for messages; never its repr (a partial's arguments may
    hold secrets)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def refuse_awaitable(result: Any, fn: Any, where: str) -> None:
    """Raise :class:`AwaitableReturned` if a callable taken for sync returned an awaitable.

    A coroutine is closed first, so it neither runs nor warns "never awaited".
    """
    if not inspect.isawaitable(result):
        return
    if inspect.iscoroutine(result):
        result.close()
    raise AwaitableReturned(
        f"{where}: {describe(fn)} is not a coroutine function but returned"
        f" {type(result).__name__}; pass the async function itself (async def) so it is awaited"
    )
