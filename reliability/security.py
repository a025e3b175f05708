"""Secrets never leave: masking for logs, DLQ entries, events, results and API responses.

A :class:`Masker` replaces every configured secret value, every value of the current
delivery's sensitive arguments (:func:`set_delivery_values`) and the patterns of
:mod:`reliability.patterns` (URL passwords, bearer tokens, API keys, card numbers)
wherever they appear in text or nested data; values under sensitive keys
(``password``, ``api_key``, ...) are masked whole. :class:`SensitiveArgs` says which
arguments of a task are masked whole (``sensitive_args=``). :func:`key_token` keeps
input out of Redis key names. :func:`mask_secret` shortens one value for display
(seed 000). :func:`run_security_checks` warns about missing or weak secrets at start-up.

Every operation is linear in the size of its input: literal values are replaced with
``str.replace`` and the patterns never backtrack (``bench/masking.py``).
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import inspect
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from reliability.patterns import MASK, SENSITIVE_KEY, mask_patterns

__all__ = [
    "MASK",
    "SENSITIVE_KEY",
    "Masker",
    "SensitiveArgs",
    "changed_arguments",
    "clear_delivery_values",
    "key_token",
    "mask_secret",
    "run_security_checks",
    "set_delivery_values",
]

# Secrets shorter than this are not masked by value (too likely to hit innocent text);
# the settings validation refuses them in production instead.
MIN_SECRET_LENGTH = 4
# One delivery's sensitive argument values masked by value, at most this many (the
# longest); the arguments themselves are masked whole whatever their size.
MAX_DELIVERY_VALUES = 32
# A preview (an argument repr) shows at most this many items per container and this
# many values in all; the rest is shown as ELLIPSIS.
PREVIEW_ITEMS = 32
PREVIEW_NODES = 128
ELLIPSIS = "..."
# Input kept verbatim in a Redis key name: short, and of a charset that cannot form a
# key separator (':'), a glob or a hashed token ('='). Anything else is hashed.
_SAFE_KEY_PART = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def mask_secret(value: str, visible_chars: int = 4) -> str:
    """``"sk_live_1234567890abcdef"`` -> ``"***cdef"``; short values are fully masked."""
    if not value or len(value) <= visible_chars * 2:
        return MASK
    return MASK + value[-visible_chars:]


def hashed_token(value: str) -> str:
    """``sha256=<hex>``: a value's stand-in in a key name (deterministic, one-way)."""
    return "sha256=" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def key_token(value: str) -> str:
    """``value`` as a Redis key part: verbatim when short and safe, else :func:`hashed_token`.

    Producer headers (``idempotency_key``, ``tenant_id``) and ids land in key names;
    only a short ``[A-Za-z0-9_.-]`` value is kept readable, never one that could hold a
    secret, a separator or a glob.
    """
    return value if _SAFE_KEY_PART.fullmatch(value) else hashed_token(value)


def _forms(values: Iterable[str]) -> tuple[str, ...]:
    """Values as they appear raw and inside a JSON string (rendered log lines escape
    quotes, backslashes and non-ASCII), longest first so no shorter one cuts a longer."""
    plain = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH}
    escaped = {json.dumps(v)[1:-1] for v in plain}
    return tuple(sorted(plain | escaped, key=len, reverse=True))


# The current delivery's sensitive argument values (set by the task for the length of
# one delivery, so an exception message or a log line quoting them is masked too).
_delivery: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "reliable_sensitive_values", default=()
)


def set_delivery_values(values: Iterable[str]) -> None:
    """Mask these values by value until the next delivery (or :func:`clear_delivery_values`)."""
    _delivery.set(_forms(values))


def clear_delivery_values() -> None:
    _delivery.set(())


@dataclass(frozen=True)
class SensitiveArgs:
    """Which arguments of one task are masked whole (the task's ``sensitive_args``)."""

    names: frozenset[str] = frozenset()
    positions: frozenset[int] = frozenset()
    star_from: int | None = None  # ``*args`` named: every positional from here
    star_kwargs: bool = False  # ``**kwargs`` named: every keyword not a parameter
    parameters: frozenset[str] = frozenset()

    @classmethod
    def of(cls, names: Iterable[str], signature: inspect.Signature) -> SensitiveArgs:
        wanted = frozenset(names)
        positions: set[int] = set()
        star_from, star_kwargs, parameters = None, False, set()
        kinds = inspect.Parameter
        for index, (name, param) in enumerate(signature.parameters.items()):
            if param.kind is kinds.VAR_POSITIONAL:
                star_from = index if name in wanted else star_from
            elif param.kind is kinds.VAR_KEYWORD:
                star_kwargs = star_kwargs or name in wanted
            else:
                parameters.add(name)
                if name in wanted and param.kind is not kinds.KEYWORD_ONLY:
                    positions.add(index)
        return cls(wanted, frozenset(positions), star_from, star_kwargs, frozenset(parameters))

    def __bool__(self) -> bool:
        return bool(self.names)

    def _position(self, index: int) -> bool:
        return index in self.positions or (self.star_from is not None and index >= self.star_from)

    def _keyword(self, name: str) -> bool:
        return name in self.names or (self.star_kwargs and name not in self.parameters)

    def redact(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Copies with the sensitive arguments replaced by ``***`` (nothing else touched)."""
        if not self:
            return list(args), dict(kwargs)
        return (
            [MASK if self._position(i) else v for i, v in enumerate(args)],
            {k: MASK if self._keyword(k) else v for k, v in kwargs.items()},
        )

    def values(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[str]:
        """The text the sensitive arguments hold (string and number leaves), longest
        first, at most :data:`MAX_DELIVERY_VALUES`: masked by value in free text."""
        if not self:
            return []
        roots = [v for i, v in enumerate(args) if self._position(i)]
        roots += [v for k, v in kwargs.items() if self._keyword(k)]
        found: set[str] = set()
        stack: list[Any] = roots
        seen = 0
        while stack and seen < 10_000:  # bounded walk: a huge structure is masked whole
            node = stack.pop()
            seen += 1
            if isinstance(node, str):
                found.add(node)
            elif isinstance(node, int | float) and not isinstance(node, bool):
                found.add(str(node))
            elif isinstance(node, Mapping):
                stack.extend(node.values())
            elif isinstance(node, list | tuple):
                stack.extend(node)
        usable = [v for v in found if len(v) >= MIN_SECRET_LENGTH]
        return sorted(usable, key=len, reverse=True)[:MAX_DELIVERY_VALUES]


NO_SENSITIVE_ARGS = SensitiveArgs()


def changed_arguments(
    parameters: Sequence[str],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    masked_args: Sequence[Any],
    masked_kwargs: Mapping[str, Any],
) -> list[str]:
    """Names of the arguments masking changed (``args[i]`` past the named parameters).

    A DLQ entry lists them: redriving it would run the work with ``***`` in their place.
    """
    names = [
        parameters[i] if i < len(parameters) else f"args[{i}]"
        for i, (raw, shown) in enumerate(zip(args, masked_args, strict=False))
        if not _same(raw, shown)
    ]
    names += [k for k, v in kwargs.items() if not _same(v, masked_kwargs.get(k))]
    return names


def _same(raw: Any, shown: Any) -> bool:
    """Equal after masking (a tuple shown as a list is unchanged)."""
    if isinstance(raw, tuple):
        raw = list(raw)
    try:
        return bool(raw == shown)
    except Exception:  # an exotic __eq__: count it as changed
        return False


class Masker:
    """Replaces secrets in text and nested data with ``***`` (see the module docstring)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._literals = _forms(secrets)
        self._merged: tuple[tuple[str, ...], tuple[str, ...]] = ((), self._literals)

    def including(self, values: Iterable[str]) -> Masker:
        """This masker, also masking ``values`` (a delivery's sensitive values) by value."""
        extra = _forms(values)
        if not extra:
            return self
        masker = Masker()
        masker._literals = tuple(sorted({*self._literals, *extra}, key=len, reverse=True))
        masker._merged = ((), masker._literals)
        return masker

    def _values(self) -> tuple[str, ...]:
        extra = _delivery.get()
        if not extra:
            return self._literals
        cached_for, merged = self._merged
        if cached_for is not extra:
            merged = tuple(sorted((*self._literals, *extra), key=len, reverse=True))
            self._merged = (extra, merged)
        return merged

    def text(self, value: str) -> str:
        """``value`` with configured secrets, the delivery's values and patterns masked."""
        for literal in self._values():
            if literal in value:
                value = value.replace(literal, MASK)
        return mask_patterns(value)

    def raw(self, value: bytes) -> bytes:
        """Bytes with secrets masked (undecodable message bodies kept in the DLQ)."""
        text = value.decode("utf-8", errors="surrogateescape")
        return self.text(text).encode("utf-8", errors="surrogateescape")

    def exception(self, exc: BaseException) -> None:
        """Mask secrets in an exception's arguments and its whole cause/context chain, in
        place: Celery stores and logs the formatted traceback of what it is given."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            masked = self.data(list(current.args))
            if masked != list(current.args):
                current.args = tuple(masked)
            current = current.__cause__ or current.__context__

    def values(self, value: Any) -> Any:
        """A copy of nested data with secrets masked in its text (keys not judged: for
        results, which a caller may legitimately shape with a "token" field)."""
        return self._copy(value, judge_keys=False)

    def data(self, value: Any, key: str = "") -> Any:
        """A copy of nested data with secrets masked (values under sensitive keys too)."""
        return self._copy(value, key)

    def call(
        self,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        sensitive: SensitiveArgs = NO_SENSITIVE_ARGS,
    ) -> tuple[list[Any], dict[str, Any]]:
        """A task call's arguments masked: sensitive ones whole, the rest as :meth:`data`."""
        redacted_args, redacted_kwargs = sensitive.redact(args, kwargs)
        return (self._copy(redacted_args), self._copy(redacted_kwargs))

    def preview(self, value: Any, max_chars: int) -> Any:
        """A small masked copy of nested data for display (an argument repr): at most
        :data:`PREVIEW_ITEMS` items per container and :data:`PREVIEW_NODES` values in
        all (the rest shown as ``"..."``), strings cut to ``max_chars`` before they are
        masked. Its ``repr`` is bounded whatever the input's size or depth."""
        root: list[Any] = [None]
        queue: collections.deque[tuple[Any, Any, Any, str]] = collections.deque(
            [(root, 0, value, "")]
        )
        budget = PREVIEW_NODES
        while queue:
            parent, slot, node, name = queue.popleft()  # breadth first: the first items win
            budget -= 1
            if budget < 0:
                parent[slot] = ELLIPSIS
            elif name and isinstance(node, str | bytes) and node and SENSITIVE_KEY.search(name):
                parent[slot] = MASK
            elif isinstance(node, str):
                cut = len(node) > max_chars
                parent[slot] = self.text(node[:max_chars]) + (ELLIPSIS if cut else "")
            elif isinstance(node, Mapping):
                items = list(itertools.islice(node.items(), PREVIEW_ITEMS))
                mapping: dict[Any, Any] = dict.fromkeys(k for k, _ in items)
                queue.extend((mapping, k, v, str(k)) for k, v in items)
                if len(node) > PREVIEW_ITEMS:
                    mapping[ELLIPSIS] = ELLIPSIS
                parent[slot] = mapping
            elif isinstance(node, list | tuple):
                shown = [None] * min(len(node), PREVIEW_ITEMS)
                queue.extend((shown, i, v, name) for i, v in enumerate(node[:PREVIEW_ITEMS]))
                if len(node) > PREVIEW_ITEMS:
                    shown.append(ELLIPSIS)
                parent[slot] = shown
            elif node is None or isinstance(node, bool | int | float):
                parent[slot] = node
            else:  # datetimes, decimals, UUIDs...: their repr, cut and masked
                parent[slot] = self.text(repr(node)[:max_chars])
        return root[0]

    def processor(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor for the event dict: masks values under sensitive keys, at
        any depth of nested data.

        Secret values and patterns are removed from the rendered line by :meth:`rendered`,
        one pass per line instead of a walk over every string.
        """
        for key, value in event_dict.items():
            if isinstance(value, str | bytes):
                if value and SENSITIVE_KEY.search(key):
                    event_dict[key] = MASK
            elif isinstance(value, Mapping | list | tuple):
                event_dict[key] = self._copy(value, key, mask_text=False)
        return event_dict

    def rendered(self, _logger: Any, _method: str, line: Any) -> Any:
        """A structlog processor after the renderer: masks secrets in the final text."""
        return self.text(line) if isinstance(line, str) else line

    def _copy(
        self,
        value: Any,
        key: str = "",
        *,
        judge_keys: bool = True,
        mask_text: bool = True,
    ) -> Any:
        """Copy nested data, masking as it goes: iterative (no recursion limit on deep
        input), each container copied once (shared references stay shared)."""
        root: list[Any] = [None]
        stack: list[tuple[Any, Any, Any, str]] = [(root, 0, value, key)]
        copies: dict[int, Any] = {}
        while stack:
            parent, slot, node, name = stack.pop()
            if (
                judge_keys
                and name
                and isinstance(node, str | bytes)
                and node
                and SENSITIVE_KEY.search(name)
            ):
                parent[slot] = MASK
            elif isinstance(node, str):
                parent[slot] = self.text(node) if mask_text else node
            elif isinstance(node, Mapping | list | tuple):
                known = copies.get(id(node))
                if known is not None:
                    parent[slot] = known
                    continue
                if isinstance(node, Mapping):
                    mapping: dict[Any, Any] = dict.fromkeys(node)
                    stack.extend((mapping, k, v, str(k)) for k, v in node.items())
                    copy: Any = mapping
                else:
                    # Items of a list under a sensitive key are judged by that key.
                    copy = [None] * len(node)
                    stack.extend((copy, i, v, name) for i, v in enumerate(node))
                copies[id(node)] = parent[slot] = copy
            else:
                parent[slot] = node
        return root[0]


def run_security_checks(settings: Any, *, production: bool) -> list[str]:
    """Warn (log) about missing or weak secrets; returns the warnings."""
    log = structlog.get_logger("reliability.security")
    warnings: list[str] = []
    providers = settings.providers
    for name in ("payment_api_key", "notification_api_key"):
        secret = getattr(providers, name)
        value = secret.get_secret_value() if secret is not None else ""
        if not value:
            warnings.append(f"providers.{name} is not set")
        elif len(value) < 16:
            warnings.append(f"providers.{name} is shorter than 16 characters")
    redis_url = settings.redis.url.get_secret_value() if settings.redis.url else ""
    if production and redis_url and "@" not in redis_url and "unix" not in redis_url:
        warnings.append("redis.url has no password: production Redis should require AUTH")
    for warning in warnings:
        log.warning("security_check_warning", problem=warning)
    if not warnings:
        log.info("security_checks_passed")
    return warnings
