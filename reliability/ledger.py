"""The outcome ledger: a Redis stream with one entry per delivery outcome.

Every delivery of a reliable task ends in exactly one entry, written in the same
script as the state change it reports (so the ledger never disagrees with the store).
Tests and operators reconcile sent task ids against it: "0 lost" is counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reliability import scripts
from reliability.store import Store

# KEYS ledger   ARGV now, maxlen, task_id, name, outcome, attempt, detail
RECORD = scripts.compose(
    "ledger",
    body="ledger_add(KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])\nreturn 1",
)


class Outcome(StrEnum):
    """What one delivery ended as. Those in ``FINAL`` settle the task for good."""

    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"  # duplicate of a completed idempotency key: stored result returned
    SKIPPED_DEGRADED = "skipped_degraded"  # not run: its degradation plan skips this level
    DEAD_LETTERED = "dead_lettered"
    REVOKED = "revoked"
    FALLBACK = "fallback"  # the breaker was open; the task's fallback served the call
    # A stale holder finished after a successor took its key over: its work is done by
    # the successor (same or another task id), so the message is settled.
    SUPERSEDED = "superseded"
    RETRIED = "retried"  # parked for a later attempt
    DEFERRED = "deferred"  # parked without spending an attempt (key in progress, ...)
    DUPLICATE_DELIVERY = "duplicate_delivery"  # another copy of this delivery already ran
    REQUEUED = "requeued"  # the pool child died; the broker redelivers the message
    REDRIVEN = "redriven"  # a DLQ entry re-enqueued (detail: dlq <entry id>)


def ran_for(seconds: float) -> str:
    """A ledger record's ``duration`` argument: the seconds the body ran, or '' when it
    did not run (a delivery's duration stays 0 until its body returns)."""
    return f"{seconds:.6f}" if seconds > 0 else ""


FINAL = frozenset(
    {
        Outcome.SUCCEEDED,
        Outcome.SKIPPED,
        Outcome.SKIPPED_DEGRADED,
        Outcome.DEAD_LETTERED,
        Outcome.REVOKED,
        Outcome.FALLBACK,
        Outcome.SUPERSEDED,
    }
)


@dataclass
class Reconciliation:
    """Sent task ids sorted by what the ledger says became of them."""

    settled: dict[str, str] = field(default_factory=dict)  # task id -> final outcome
    pending: list[str] = field(default_factory=list)  # seen, not yet final
    missing: list[str] = field(default_factory=list)  # never seen at all

    @property
    def lost(self) -> int:
        return len(self.pending) + len(self.missing)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.settled.values() if o == outcome)


class Ledger:
    """Write and read the outcome stream."""

    def __init__(self, store: Store, max_len: int = 1_000_000) -> None:
        self.store = store
        self.max_len = max_len

    @property
    def key(self) -> str:
        return self.store.keys.ledger

    def record(
        self, task_id: str, name: str, outcome: Outcome | str, attempt: int = 1, detail: str = ""
    ) -> None:
        """One entry for an outcome decided outside the settle scripts (revoked, ...)."""
        self.store.run(
            RECORD,
            [self.key],
            ["", self.max_len, task_id, name, str(outcome), attempt, detail],
            "ledger record",
        )

    def entries(self, start: str = "-", count: int | None = None) -> list[dict[str, Any]]:
        rows = self.store.call(
            "ledger read", lambda c: c.xrange(self.key, min=start, max="+", count=count)
        )
        return _entries(rows)

    def tail(self, count: int = 50) -> list[dict[str, Any]]:
        rows = self.store.call("ledger read", lambda c: c.xrevrange(self.key, count=count))
        return _entries(rows)

    def outcomes(self, task_ids: Iterable[str] | None = None) -> dict[str, list[str]]:
        wanted = set(task_ids) if task_ids is not None else None
        found: dict[str, list[str]] = {}
        last = "-"
        while True:
            batch = self.entries(start=last, count=10_000)
            if last != "-" and batch and batch[0]["id"] == last:
                batch = batch[1:]
            if not batch:
                return found
            for row in batch:
                tid = row.get("task_id", "")
                if wanted is None or tid in wanted:
                    found.setdefault(tid, []).append(row.get("outcome", ""))
            last = batch[-1]["id"]

    def reconcile(self, task_ids: Iterable[str]) -> Reconciliation:
        ids = list(task_ids)
        seen = self.outcomes(ids)
        result = Reconciliation()
        for tid in ids:
            outcomes = seen.get(tid)
            if not outcomes:
                result.missing.append(tid)
                continue
            final = [o for o in outcomes if o in FINAL]
            if final:
                result.settled[tid] = final[0]
            else:
                result.pending.append(tid)
        return result


def _entries(rows: Iterable[tuple[Any, Mapping[Any, Any] | None]] | None) -> list[dict[str, Any]]:
    """Stream entries as dicts with their ``id``; redis-py may parse a reply as None (no
    entries) and an entry's fields as None (deleted under it): both read as empty."""
    return [{"id": entry_id, **(fields or {})} for entry_id, fields in rows or ()]
