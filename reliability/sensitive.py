"""Sensitive values: which arguments of a task are secrets, and the current delivery's.

A task lists its secret arguments in ``sensitive_args``; :class:`SensitiveArgs` resolves
them on the task's signature, replaces them whole (:meth:`SensitiveArgs.redact`) and
collects the text they hold (:meth:`SensitiveArgs.values`). While a delivery runs,
those values are masked by value everywhere the :class:`~reliability.security.Masker`
looks (:func:`set_delivery_values`, a context variable): an exception message or a log
line quoting an ``api_key`` is masked too. :func:`changed_arguments` names the
arguments masking altered, which a DLQ entry records (it cannot be redriven).
"""

from __future__ import annotations

import contextvars
import inspect
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reliability.patterns import MASK

# Secrets shorter than this are not masked by value (too likely to hit innocent text);
# the settings validation refuses them in production instead.
MIN_SECRET_LENGTH = 4
# One delivery's sensitive argument values masked by value, at most this many (the
# longest); the arguments themselves are masked whole whatever their size.
MAX_DELIVERY_VALUES = 32


def literal_forms(values: Iterable[str]) -> tuple[str, ...]:
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
    _delivery.set(literal_forms(values))


def clear_delivery_values() -> None:
    _delivery.set(())


def delivery_values() -> tuple[str, ...]:
    """The current delivery's values (raw and JSON-escaped), longest first."""
    return _delivery.get()


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
