"""Secrets never leave: masking for logs, DLQ entries, events, results and API responses.

A :class:`Masker` replaces every configured secret value, every value of the current
delivery's sensitive arguments (:mod:`reliability.sensitive`) and the patterns of
:mod:`reliability.patterns` (URL passwords, bearer tokens, API keys, card numbers)
wherever they appear in text or nested data; values under sensitive keys
(``password``, ``api_key``, ...) are masked whole, as are a task's ``sensitive_args``
(:meth:`Masker.call`). :func:`key_token` keeps
input out of Redis key names. :func:`mask_secret` shortens one value for display
(seed 000).

Every operation is linear in the size of its input: literal values are replaced with
``str.replace`` and the patterns never backtrack (``bench/masking.py``).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from reliability.patterns import MASK, SENSITIVE_KEY, mask_patterns, sensitive_key
from reliability.sensitive import NO_SENSITIVE_ARGS, SensitiveArgs, delivery_values, literal_forms

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "ELLIPSIS",
    "MASK",
    "SENSITIVE_KEY",
    "Masker",
    "hashed_token",
    "key_token",
    "mask_secret",
]

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
    only a short ``[A-Za-z0-9_.-]`` value that the pattern masker leaves alone is kept
    readable — never one that could hold a separator or a glob, nor a card number or an
    API key (``4012888888881881``, ``sk_live_...``) used as an idempotency key.
    """
    if _SAFE_KEY_PART.fullmatch(value) and mask_patterns(value) == value:
        return value
    return hashed_token(value)


class Masker:
    """Replaces secrets in text and nested data with ``***`` (see the module docstring)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._literals = literal_forms(secrets)
        self._merged: tuple[tuple[str, ...], tuple[str, ...]] = ((), self._literals)

    def including(self, values: Iterable[str]) -> Masker:
        """This masker, also masking ``values`` (a delivery's sensitive values) by value."""
        extra = literal_forms(values)
        if not extra:
            return self
        masker = Masker()
        masker._literals = tuple(sorted({*self._literals, *extra}, key=len, reverse=True))
        masker._merged = ((), masker._literals)
        return masker

    def _values(self) -> tuple[str, ...]:
        extra = delivery_values()
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
            elif name and isinstance(node, str | bytes) and node and sensitive_key(name):
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
                shown: list[Any] = [None] * min(len(node), PREVIEW_ITEMS)
                queue.extend((shown, i, v, name) for i, v in enumerate(node[:PREVIEW_ITEMS]))
                if len(node) > PREVIEW_ITEMS:
                    shown.append(ELLIPSIS)
                parent[slot] = shown
            elif node is None or isinstance(node, bool | int | float):
                parent[slot] = node
            else:  # datetimes, decimals, UUIDs...: their repr, cut and masked
                parent[slot] = self.text(repr(node)[:max_chars])
        return root[0]

    def processor(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        """A structlog processor for the event dict: masks values under sensitive keys, at
        any depth of nested data.

        Secret values and patterns are removed from the rendered line by :meth:`rendered`,
        one pass per line instead of a walk over every string.
        """
        for key, value in event_dict.items():
            if isinstance(value, str | bytes):
                if value and sensitive_key(key):
                    event_dict[key] = MASK
            elif isinstance(value, Mapping | list | tuple):
                event_dict[key] = self._copy(value, key, mask_text=False)
        return event_dict

    def rendered(self, _logger: Any, _method: str, line: Any) -> Any:
        """A structlog processor after the renderer: masks secrets in the final text."""
        return self.text(line) if isinstance(line, str) else line

    def _copy(
        self, value: Any, key: str = "", *, judge_keys: bool = True, mask_text: bool = True
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
                and sensitive_key(name)
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
