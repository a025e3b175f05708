"""The metrics cardinality guard (seed 004): no label whose values are unbounded.

A Prometheus series exists for every distinct label set, so a label holding ids or
timestamps grows the scrape (and the server's memory) without bound. The guard checks
every family when it is defined — a label *name* such as ``job_id``, ``*_id``,
``*_uuid``, ``*_guid`` or one holding ``timestamp`` is forbidden — and every new label
*value set* when it is first used: a value that looks like a uuid, a long hex or digit
run, or a timestamp is refused, and a family may hold at most ``max_values`` distinct
label sets. Known label sets are cached, so the hot path pays one dict lookup.

``strict`` mode raises :class:`CardinalityError`; ``warning`` mode (the default) logs
each problem once per family and records the sample under the value ``other`` instead,
so the series count stays bounded either way (``RELIABLE_METRICS__CARDINALITY``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence, Set
from typing import Any, Generic, Literal, TypeVar

import structlog

log = structlog.get_logger("reliability.metrics")

Mode = Literal["strict", "warning"]
# The value a refused label value is recorded under in warning mode.
OVERFLOW = "other"

FORBIDDEN_NAMES = frozenset(
    {
        "id",
        "job_id",
        "order_id",
        "trade_id",
        "user_id",
        "transaction_id",
        "request_id",
        "task_id",
        "correlation_id",
        "idempotency_key",
        "message_id",
    }
)
FORBIDDEN_NAME = re.compile(r"(_id|_ids|_uuid|_guid|_key)$|timestamp|^time$|^date$")
UNBOUNDED_VALUE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"  # uuid
    r"|\b[0-9a-fA-F]{16,}\b"  # a long hex token (hashes, ids)
    r"|\b\d{9,}\b"  # epoch seconds / millis, long numeric ids
    r"|\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}"  # ISO-8601 date and time
)


class CardinalityError(ValueError):
    """A label name or value would make a family's series count unbounded."""


def forbidden_name(label: str) -> bool:
    return label.lower() in FORBIDDEN_NAMES or bool(FORBIDDEN_NAME.search(label.lower()))


def unbounded_value(value: str) -> bool:
    return bool(UNBOUNDED_VALUE.search(value))


class CardinalityGuard:
    """Checks label names at definition and new label value sets at first use."""

    def __init__(self, mode: Mode = "warning", max_values: int = 1000) -> None:
        self.mode: Mode = mode
        self.max_values = max_values
        self._warned: set[tuple[str, str]] = set()

    def configure(self, mode: Mode, max_values: int) -> None:
        self.mode, self.max_values = mode, max_values

    def _problem(self, family: str, kind: str, message: str) -> None:
        if self.mode == "strict":
            raise CardinalityError(f"{family}: {message}")
        if (family, kind) not in self._warned:
            self._warned.add((family, kind))
            log.warning("metric_cardinality_refused", family=family, problem=message)

    def check_names(self, family: str, labels: Sequence[str]) -> bool:
        """True when every label name is allowed (strict mode raises otherwise)."""
        bad = [label for label in labels if forbidden_name(label)]
        if bad:
            self._problem(family, "name", f"label names {bad} are unbounded (ids, timestamps)")
        return not bad

    def check_values(
        self, family: str, values: Sequence[Any], recorded: Set[tuple[str, ...]]
    ) -> tuple[str, ...]:
        """The values to record for a new label set (``recorded``: the family's sets so
        far): as given, or ``other`` for a refused value (strict mode raises instead)."""
        out = tuple(str(v) for v in values)
        if any(unbounded_value(v) for v in out):
            # Never log the value itself: it may be an id a user would not want in logs.
            self._problem(family, "value", "a label value looks like an id or a timestamp")
            out = tuple(OVERFLOW if unbounded_value(v) else v for v in out)
        if out not in recorded and len(recorded) >= self.max_values:
            self._problem(family, "count", f"more than {self.max_values} label sets")
            out = tuple(OVERFLOW for _ in out)
        return out


GUARD = CardinalityGuard()

M = TypeVar("M")
# Raw label value sets a family remembers (beyond them, refused values are checked anew).
CACHED_SETS = 10_000


class Labelled(Generic[M]):
    """A labelled prometheus-client family whose label sets pass the guard once each.

    ``labels(*values)`` returns the child, as prometheus-client's does; a label set seen
    before costs one dict lookup (cheaper than prometheus-client's own lookup).
    """

    def __init__(self, metric: Any, name: str, guard: CardinalityGuard = GUARD) -> None:
        self.metric = metric
        self.name = name
        self.guard = guard
        self._children: dict[tuple[Any, ...], M] = {}
        self._recorded: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def labels(self, *values: Any) -> M:
        child = self._children.get(values)
        if child is not None:
            return child
        with self._lock:
            allowed = self.guard.check_values(self.name, values, self._recorded)
            found: M = self.metric.labels(*allowed)
            self._recorded.add(allowed)
            if len(self._children) < CACHED_SETS:  # refused raw values: not kept forever
                self._children[values] = found
            return found

    def clear(self) -> None:
        """Forget the cached children (tests)."""
        with self._lock:
            self._children.clear()
            self._recorded.clear()
