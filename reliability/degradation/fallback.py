"""A degraded task's fallback chain: links tried in order, the first value wins.

A link is a callable (called with the task's arguments; raising passes to the next link)
or :class:`LastGood`: the task's last successful result for the same key, marked stale
(``{"value": ..., "stale": true, "cached_at": "<ISO-8601 UTC>"}``). The last good result
is written by the degradation guard's settle tail in the completion script (no extra
round trip), and read inside the admission script that decided to fall back. When no
link gives a value the delivery is deferred, as a ``defer`` level would: the work is
done later, never dropped for want of a stale answer.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from reliability.guard import Call, require
from reliability.idempotency import derive_key

# A stale result is kept this long after the success that wrote it (a day).
DEFAULT_TTL_SECONDS = 86_400


@dataclass(frozen=True)
class LastGood:
    """The last successful result of the task for the same ``key_args`` (all arguments
    when empty), kept ``ttl_seconds`` after it was written."""

    key_args: tuple[str, ...] = ()
    ttl_seconds: float = DEFAULT_TTL_SECONDS

    def check(self, task: str, signature: inspect.Signature) -> None:
        require(not isinstance(self.key_args, str), task, "LastGood key_args must be a sequence")
        missing = [a for a in self.key_args if a not in signature.parameters]
        require(not missing, task, f"LastGood key_args {missing} are not parameters of the task")
        require(self.ttl_seconds > 0, task, "LastGood ttl_seconds must be positive")

    def key(self, call: Call) -> str:
        """The Redis key of this call's last good result (argument values hashed, never
        embedded, as for idempotency keys)."""
        name = derive_key(call.spec.name, call.arguments(), None, self.key_args)
        return f"{call.rt.store.keys.prefix}:{{{call.spec.tag}}}:stale:{name}"


Link = Callable[..., Any] | LastGood


def chain_of(value: Any) -> tuple[Link, ...]:
    """The declared ``degradation_fallback`` as a tuple of links."""
    if value is None:
        return ()
    if callable(value) or isinstance(value, LastGood):
        return (value,)
    return tuple(value)


def check_chain(task: str, chain: Sequence[Any], signature: inspect.Signature) -> None:
    require(bool(chain), task, "degradation_fallback must name at least one link")
    for link in chain:
        require(
            isinstance(link, LastGood) or callable(link),
            task,
            f"degradation_fallback link {link!r} is neither callable nor LastGood(...)",
        )
        if isinstance(link, LastGood):
            link.check(task, signature)
    require(
        sum(isinstance(link, LastGood) for link in chain) <= 1,
        task,
        "degradation_fallback names LastGood more than once",
    )


def last_good(chain: Sequence[Link]) -> LastGood | None:
    return next((link for link in chain if isinstance(link, LastGood)), None)


def stale(cached: str) -> dict[str, Any] | None:
    """The stored ``{"cached_at": <unix>, "value": ...}`` as served: marked stale."""
    try:
        data: Any = json.loads(cached)
        at = datetime.fromtimestamp(float(data["cached_at"]), UTC)
    except (ValueError, TypeError, KeyError, OverflowError):
        return None
    return {
        "value": data.get("value"),
        "stale": True,
        "cached_at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


@dataclass(frozen=True)
class Served:
    """What the chain served: the value and which link (``last_good`` or a name)."""

    value: Any
    link: str


def serve(
    chain: Sequence[Link],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    cached: str | None,
    failed: Callable[[str, Exception], None],
) -> Served | None:
    """The first value a link gives (``cached``: the stored last good result, if any);
    None when every link failed. ``failed(link, error)`` hears of each failing link."""
    for link in chain:
        if isinstance(link, LastGood):
            value = stale(cached) if cached else None
            if value is not None:
                return Served(value, "last_good")
            continue
        name = getattr(link, "__name__", type(link).__name__)
        try:
            return Served(link(*args, **kwargs), name)
        except Exception as exc:
            failed(name, exc)
    return None
