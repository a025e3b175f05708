"""Retry windows (first attempt to final outcome) and the attempts histogram (seed 004).

Fed from the outcome ledger: a retried task keeps its task id, so the records of one
task id are one *logical task*; :class:`RetryWindowTracker` turns them into windows and
:class:`RetryHistogram` counts windows by the attempts they took. Pure: times come from
the records, or from an injected clock when a caller gives none.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]

# Ledger outcomes that settle a logical task for good (reliability.ledger.FINAL, as text:
# this module reads records, it does not write them).
FINAL_OUTCOMES = frozenset(
    {"succeeded", "skipped", "dead_lettered", "revoked", "fallback", "superseded"}
)
RETRIED = "retried"

# Seed 004's buckets: (label, lowest, highest attempts; None = no upper bound).
BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("1", 1, 1),
    ("2", 2, 2),
    ("3", 3, 3),
    ("4-5", 4, 5),
    ("6-10", 6, 10),
    ("11-20", 11, 20),
    ("21+", 21, None),
)
# Open windows a tracker keeps at most; beyond it the oldest is forgotten (never closed).
MAX_OPEN_WINDOWS = 200_000


@dataclass(frozen=True)
class RetryWindow:
    """One logical task from its first attempt to its final outcome."""

    task: str
    task_id: str
    started_at: float
    ended_at: float
    attempts: int
    outcome: str

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended_at - self.started_at)


@dataclass
class _Open:
    task: str
    started_at: float
    attempts: int = 1


class RetryWindowTracker:
    """Open retry windows by task id; a final outcome closes one and returns it."""

    def __init__(self, clock: Clock = time.time, max_open: int = MAX_OPEN_WINDOWS) -> None:
        self.clock = clock
        self.max_open = max_open
        self._open: OrderedDict[str, _Open] = OrderedDict()

    @property
    def open_count(self) -> int:
        return len(self._open)

    def start_window(self, task_id: str, task: str = "", at: float | None = None) -> None:
        """Open ``task_id``'s window at ``at`` (now) unless it is open already."""
        if task_id in self._open:
            return
        self._open[task_id] = _Open(task, self.clock() if at is None else at)
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)

    def increment_attempt(self, task_id: str, task: str = "", at: float | None = None) -> int:
        """Count one more attempt (opening the window if needed); the attempts so far."""
        self.start_window(task_id, task, at)
        window = self._open[task_id]
        window.attempts += 1
        return window.attempts

    def close_window(
        self,
        task_id: str,
        outcome: str,
        *,
        task: str = "",
        attempts: int | None = None,
        at: float | None = None,
    ) -> RetryWindow:
        """Close ``task_id``'s window with its final ``outcome`` (a window never opened
        starts and ends at ``at``); ``attempts`` overrides the count when known."""
        moment = self.clock() if at is None else at
        window = self._open.pop(task_id, None) or _Open(task, moment)
        return RetryWindow(
            task=task or window.task,
            task_id=task_id,
            started_at=min(window.started_at, moment),
            ended_at=moment,
            attempts=max(window.attempts, attempts or 0, 1),
            outcome=outcome,
        )

    def observe(
        self,
        task: str,
        task_id: str,
        outcome: str,
        attempt: int,
        at: float,
        duration: float | None = None,
    ) -> RetryWindow | None:
        """Feed one ledger record; the window it closed, if it was a final outcome.

        A window starts when the first attempt started (the record's time less the
        body's run time, when the record carries it) or at the first record seen.
        """
        began = at - duration if duration else at
        if outcome in FINAL_OUTCOMES:
            if task_id not in self._open:
                self.start_window(task_id, task, began)
            return self.close_window(task_id, outcome, task=task, attempts=attempt, at=at)
        self.start_window(task_id, task, began)
        if outcome == RETRIED:
            # The next delivery is attempt + 1: the attempts this window has seen so far.
            window = self._open[task_id]
            window.attempts = max(window.attempts, attempt + 1)
        return None


def bucket_of(attempts: int) -> str:
    """The histogram bucket of a logical task that took ``attempts`` attempts (>= 1)."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for label, low, high in BUCKETS:
        if attempts >= low and (high is None or attempts <= high):
            return label
    raise AssertionError("unreachable: the last bucket has no upper bound")


@dataclass
class RetryHistogram:
    """Logical tasks counted by the attempts they took (seed 004's buckets)."""

    counts: dict[str, int] = field(default_factory=lambda: {b[0]: 0 for b in BUCKETS})

    def record(self, attempts: int) -> str:
        label = bucket_of(attempts)
        self.counts[label] += 1
        return label

    def merge(self, other: RetryHistogram) -> None:
        for label, count in other.counts.items():
            self.counts[label] = self.counts.get(label, 0) + count

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
