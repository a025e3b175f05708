"""One task's (or one dependency's) numbers over a report's period, from ledger records.

Every delivery ends in one ledger record, so ``received`` (deliveries that reached an
outcome in the period) is the sum of the outcomes below; ``redriven`` records (a DLQ
redrive, written by the redrive itself) are no delivery and count only as DLQ outflow.

* ``succeeded``, ``retried``, ``dead_lettered``: records with that outcome;
  ``dead_lettered_by_class`` splits the last by failure class.
* ``failed``: attempts whose body ran and failed — ``retried`` plus dead-lettered
  ``transient``, ``permanent`` or ``retry_budget_exhausted`` (``poison``, ``expired``
  and ``conflict`` never ran the body).
* ``deduplicated``: duplicates not run — ``skipped`` (a completed idempotency key) and
  ``duplicate_delivery`` (another copy of the delivery ran).
* ``deferred``: parked without spending an attempt, by reason (``breaker_open``,
  ``limit_delay``, ``in_progress``, ...).
* ``success_rate``: (succeeded + fallback) / (succeeded + fallback + dead-lettered).
* ``retry_amplification``: attempts per logical task, over the logical tasks (task ids)
  whose final outcome fell in the period, duplicates excluded; ``attempts_histogram``
  counts the same tasks by attempts.
* ``run_time_seconds``: nearest-rank p50/p95/p99 of the body's run time, from the
  ``duration`` the settle scripts write on each record whose body ran.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from reliability.analytics import RetryHistogram, RetryWindow
from reliability.reports.sources import Record

REDRIVEN = "redriven"  # outcome of a DLQ redrive's ledger record (not a delivery)
RAN_CLASSES = frozenset({"transient", "permanent", "retry_budget_exhausted"})
DUPLICATES = frozenset({"skipped", "duplicate_delivery"})
PERCENTILES = (50, 95, 99)


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least ``p``% of the values at
    or below it (None for no values)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Totals:
    """Counters fed record by record; :meth:`summary` is the report's view of them."""

    outcomes: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)
    dead_lettered_by_class: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    durations: list[float] = field(default_factory=list)
    histogram: RetryHistogram = field(default_factory=RetryHistogram)
    window_seconds: list[float] = field(default_factory=list)
    attempts: int = 0  # summed over the logical tasks that ended in the period

    def add(self, record: Record) -> None:
        """Count one record of the period."""
        self.outcomes[record.outcome] += 1
        if record.outcome == "deferred":
            self.deferred[record.detail or "unknown"] += 1
        elif record.outcome == "dead_lettered":
            self.dead_lettered_by_class[record.detail or "unknown"] += 1
            if record.detail in RAN_CLASSES:
                self.failed += 1
        elif record.outcome == "retried":
            self.failed += 1
        if record.duration is not None:
            self.durations.append(record.duration)

    def add_window(self, window: RetryWindow) -> None:
        """Count one logical task whose final outcome fell in the period."""
        if window.outcome in DUPLICATES:
            return
        self.histogram.record(window.attempts)
        self.window_seconds.append(window.seconds)
        self.attempts += window.attempts

    def merge(self, other: Totals) -> None:
        self.outcomes.update(other.outcomes)
        self.deferred.update(other.deferred)
        self.dead_lettered_by_class.update(other.dead_lettered_by_class)
        self.failed += other.failed
        self.durations.extend(other.durations)
        self.histogram.merge(other.histogram)
        self.window_seconds.extend(other.window_seconds)
        self.attempts += other.attempts

    @property
    def received(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome != REDRIVEN)

    @property
    def logical_tasks(self) -> int:
        return self.histogram.total

    def success_rate(self) -> float | None:
        good = self.outcomes["succeeded"] + self.outcomes["fallback"]
        settled = good + self.outcomes["dead_lettered"]
        return round(good / settled, 6) if settled else None

    def summary(self, objective: float | None = None) -> dict[str, Any]:
        """The JSON-ready numbers (see the module docstring)."""
        o = self.outcomes
        durations = sorted(self.durations)
        windows = sorted(self.window_seconds)
        data: dict[str, Any] = {
            "received": self.received,
            "succeeded": o["succeeded"],
            "failed": self.failed,
            "retried": o["retried"],
            "deduplicated": sum(o[d] for d in sorted(DUPLICATES)),
            "deferred": dict(sorted(self.deferred.items())),
            "dead_lettered": o["dead_lettered"],
            "dead_lettered_by_class": dict(sorted(self.dead_lettered_by_class.items())),
            "fallback": o["fallback"],
            "dlq_inflow": o["dead_lettered"],
            "dlq_outflow": o[REDRIVEN],
            "success_rate": self.success_rate(),
            "logical_tasks": self.logical_tasks,
            "retry_amplification": (
                round(self.attempts / self.logical_tasks, 4) if self.logical_tasks else None
            ),
            "attempts_histogram": self.histogram.as_dict(),
            "run_time_seconds": {
                "samples": len(durations),
                **{f"p{p}": percentile(durations, p) for p in PERCENTILES},
            },
            "retry_window_seconds": {
                "p50": _round(percentile(windows, 50)),
                "p95": _round(percentile(windows, 95)),
                "max": _round(windows[-1] if windows else None),
            },
            "outcomes": dict(sorted(o.items())),
        }
        if objective is not None:
            data["slo"] = slo_burn(objective, data["success_rate"])
        return data


def slo_burn(objective: float, success_rate: float | None) -> dict[str, Any]:
    """How fast the period spent the error budget: ``burn_rate`` = error rate / (1 -
    objective); 1.0 spends the budget exactly over the objective's window, above 1
    faster (``status`` ``burning``), no settled task = ``no_data``."""
    if success_rate is None:
        return {"objective": objective, "burn_rate": None, "status": "no_data"}
    burn = round((1 - success_rate) / (1 - objective), 4)
    return {"objective": objective, "burn_rate": burn, "status": "burning" if burn > 1 else "ok"}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
