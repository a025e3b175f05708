"""What a report reads from Redis: ledger records, breaker transitions, DLQ entries.

Everything is read in bounded batches by time range: the outcome ledger by stream id
(each id is the Redis time of the write), the breaker transitions stream (capped at
about 10,000 entries by the breaker script) whole up to the period's end, and the DLQ
index (scored by the time an entry was added) by score.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from reliability.breaker.config import EVENTS_STREAM
from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.store import Store

BATCH = 10_000
DLQ_BATCH = 200
# DLQ entries read at most for one report's fingerprints and for the per-task oldest age.
DLQ_PERIOD_CAP = 10_000
DLQ_OLDEST_SCAN = 1_000


@dataclass(frozen=True)
class Record:
    """One outcome-ledger entry, parsed."""

    ms: int  # the stream id's time (Redis time of the write)
    task: str
    task_id: str
    outcome: str
    attempt: int
    detail: str
    at: float
    duration: float | None  # seconds the body ran; None when it did not run


def parse_record(entry_id: str, fields: Mapping[str, Any]) -> Record | None:
    """A ledger entry as a :class:`Record`; None for one that does not parse."""
    try:
        ms = int(str(entry_id).split("-", 1)[0])
        raw_duration = fields.get("duration")
        at = fields.get("at")
        return Record(
            ms=ms,
            task=str(fields["task"]),
            task_id=str(fields.get("task_id", "")),
            outcome=str(fields["outcome"]),
            attempt=max(1, int(fields.get("attempt") or 1)),
            detail=str(fields.get("detail") or ""),
            at=float(at) if at else ms / 1000,
            duration=float(raw_duration) if raw_duration else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class LedgerRead:
    """What reading the ledger found beside the records."""

    unreadable: int = 0  # entries that did not parse (skipped)
    oldest_ms: int | None = None  # the oldest entry the stream still holds
    length: int = 0  # entries the stream holds


def ledger_records(
    store: Store, key: str, since: float, until: float, read: LedgerRead | None = None
) -> Iterator[Record]:
    """The ledger's records written in ``[since, until)``, oldest first, in batches."""
    read = read if read is not None else LedgerRead()
    first, read.length = store.call("report ledger", functools.partial(_head, key))
    if first:
        read.oldest_ms = int(str(first[0][0]).split("-", 1)[0])
    low, high = f"{math.floor(since * 1000)}", f"{math.floor(until * 1000) - 1}"
    if int(high) < int(low):
        return
    while True:
        rows = store.call("report ledger", functools.partial(_xrange, key, low, high))
        for entry_id, fields in rows or ():
            record = parse_record(entry_id, fields or {})
            if record is None:
                read.unreadable += 1
            else:
                yield record
        if not rows or len(rows) < BATCH:
            return
        low = f"({rows[-1][0]}"


@dataclass(frozen=True)
class Transition:
    """One breaker transition from the fleet's transitions stream."""

    breaker: str
    source: str
    target: str
    at: float


def breaker_transitions(store: Store, until: float) -> list[Transition]:
    """Every transition the stream holds up to ``until`` (by the ``at`` it records),
    oldest first: the state before a period is the last transition before it."""
    key = f"{store.keys.prefix}:{EVENTS_STREAM}"
    found: list[Transition] = []
    low = "-"
    while True:
        rows = store.call("report breakers", functools.partial(_xrange, key, low, "+"))
        for _entry_id, fields in rows or ():
            try:
                at = float(fields["at"])
                if at < until:
                    found.append(
                        Transition(
                            str(fields["breaker"]), str(fields["from"]), str(fields["to"]), at
                        )
                    )
            except (KeyError, TypeError, ValueError):
                continue
        if not rows or len(rows) < BATCH:
            break
        low = f"({rows[-1][0]}"
    found.sort(key=lambda t: t.at)
    return found


@dataclass
class DlqView:
    """The DLQ as a report sees it: entries added in the period, size, oldest entries."""

    size: int
    oldest_at: float | None
    in_period: list[DeadLetter]
    oldest_by_task: dict[str, float]  # among the oldest DLQ_OLDEST_SCAN entries


def dlq_view(store: Store, start: float, end: float) -> DlqView:
    """Entries added in ``[start, end)`` (at most ``DLQ_PERIOD_CAP``), the DLQ's size
    and oldest entry, and each task's oldest entry among the oldest ones."""
    index = store.keys.dlq_index

    def overview(c: Any) -> tuple[int, list[Any], list[Any]]:
        pipe = c.pipeline(transaction=False)
        pipe.zcard(index)
        pipe.zrange(index, 0, DLQ_OLDEST_SCAN - 1, withscores=True)
        pipe.zrangebyscore(index, start, f"({end}", start=0, num=DLQ_PERIOD_CAP)
        size, oldest, ids = pipe.execute()
        return int(size), list(oldest), list(ids)

    size, oldest, ids = store.call("report dlq", overview)
    added = {str(entry_id): float(score) for entry_id, score in oldest}
    oldest_by_task: dict[str, float] = {}
    for entry in _entries(store, [entry_id for entry_id, _ in oldest]):
        oldest_by_task.setdefault(entry.task_name, added[entry.id])
    return DlqView(
        size=size,
        oldest_at=float(oldest[0][1]) if oldest else None,
        in_period=list(_entries(store, ids)),
        oldest_by_task=oldest_by_task,
    )


def _entries(store: Store, ids: list[Any]) -> Iterator[DeadLetter]:
    """The entries of ``ids`` in order, read in batches (removed ones skipped, an
    unreadable one as its stand-in)."""
    dlq = DeadLetterQueue(store)
    for offset in range(0, len(ids), DLQ_BATCH):
        yield from dlq.read(ids[offset : offset + DLQ_BATCH])


def _xrange(key: str, low: str, high: str, client: Any) -> list[Any]:
    return list(client.xrange(key, min=low, max=high, count=BATCH) or ())


def _head(key: str, client: Any) -> tuple[list[Any], int]:
    pipe = client.pipeline(transaction=False)
    pipe.xrange(key, count=1)
    pipe.xlen(key)
    first, length = pipe.execute()
    return list(first or ()), int(length)
