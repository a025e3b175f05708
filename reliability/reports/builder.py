"""Build one reliability report: a period's ledger, breakers and DLQ, summed up.

Per task and per dependency (a task's dependency is the breaker it declares; the worker
passes the map, this library never reads tasks): the counts of :mod:`.totals`, breaker
open time and flaps, DLQ inflow, outflow and oldest age; for the whole period: the top
error fingerprints of the DLQ entries added in it, retry anomalies and spikes (the
detectors of :mod:`reliability.analytics`, fed from the ledger), SLO burn where a task
has an objective. Every time in the report is ISO-8601 UTC.

The ledger is read from ``lookback_seconds`` before the period: records there open the
retry windows of tasks that finish in the period and prime the spike baseline, but are
not counted. One pass, in batches; memory is the period's run times plus the open
windows (bounded).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reliability.analytics import (
    Anomaly,
    AnomalyThresholds,
    RetryAnomalyDetector,
    RetrySpikeDetector,
    RetryWindowTracker,
    Spike,
)
from reliability.reports.breakers import BreakerStats, breaker_stats
from reliability.reports.period import Period, iso
from reliability.reports.sources import (
    DlqView,
    LedgerRead,
    breaker_transitions,
    dlq_view,
    ledger_records,
)
from reliability.reports.totals import DUPLICATES, REDRIVEN, Totals
from reliability.store import Store

VERSION = 1
# A stream this full of its cap is being trimmed (MAXLEN ~ trims in whole nodes).
TRIMMED_SHARE = 0.9


@dataclass(frozen=True)
class ReportConfig:
    """What a report needs besides the data (the worker builds it from settings)."""

    lookback_seconds: float = 3600.0
    top_fingerprints: int = 10
    anomalies: AnomalyThresholds = field(default_factory=AnomalyThresholds)
    spike_window_seconds: float = 60.0
    spike_baseline_seconds: float = 900.0
    spike_multiplier: float = 3.0
    spike_min_retries: int = 10
    objectives: Mapping[str, float] = field(default_factory=dict)  # task -> success rate
    ledger_max_len: int = 1_000_000
    max_listed: int = 20  # anomaly groups and spikes listed at most


@dataclass
class _Pass:
    """The state of one pass over the ledger."""

    config: ReportConfig
    period: Period
    now: float
    tasks: dict[str, Totals] = field(default_factory=dict)
    anomalies: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    spikes: list[Spike] = field(default_factory=list)
    detectors: dict[str, RetrySpikeDetector] = field(default_factory=dict)
    records: int = 0

    def spike_detector(self, task: str) -> RetrySpikeDetector:
        found = self.detectors.get(task)
        if found is None:
            c = self.config
            found = self.detectors[task] = RetrySpikeDetector(
                c.spike_window_seconds,
                c.spike_baseline_seconds,
                c.spike_multiplier,
                c.spike_min_retries,
                task=task,
                since=self.period.start - c.lookback_seconds,
                clock=lambda: self.now,
            )
        return found

    def anomaly(self, found: Anomaly) -> None:
        group = self.anomalies.setdefault(
            (found.task, found.kind),
            {
                "kind": found.kind,
                "task": found.task,
                "count": 0,
                "worst": found.value,
                "threshold": found.threshold,
                "example_task_id": found.task_id,
                "message": found.message(),
            },
        )
        group["count"] += 1
        if found.value > group["worst"]:
            group.update(worst=found.value, example_task_id=found.task_id, message=found.message())


def build_report(
    store: Store,
    period: Period,
    *,
    dependencies: Mapping[str, str] | None = None,
    config: ReportConfig | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The report of ``period`` as a JSON-ready dict (see the module docstring).
    ``dependencies``: task name -> the breaker it declares."""
    config = config or ReportConfig()
    deps = dict(dependencies or {})
    moment = time.time() if now is None else now
    state = _Pass(config, period, moment)
    read = LedgerRead()
    _read_ledger(store, state, read)
    rates = RetryAnomalyDetector(config.anomalies)
    for task, totals in state.tasks.items():
        ran = totals.outcomes["succeeded"] + totals.failed
        rate = rates.check_rate(task, ran, totals.outcomes["retried"], at=period.end)
        if rate is not None:
            state.anomaly(rate)
    breakers = breaker_stats(breaker_transitions(store, period.end), period.start, period.end)
    view = dlq_view(store, period.start, period.end)
    everything = Totals()
    for totals in state.tasks.values():
        everything.merge(totals)
    return {
        "version": VERSION,
        "period": period.name,
        "start": iso(period.start),
        "end": iso(period.end),
        "generated_at": iso(moment),
        "ledger": {
            "records": state.records,
            "unreadable": read.unreadable,
            "oldest_record_at": iso(read.oldest_ms / 1000) if read.oldest_ms else None,
            # The stream is at its cap (RELIABLE_LEDGER__MAX_LEN) and no longer holds the
            # period's start: the counts miss its first records.
            "trimmed": bool(
                read.oldest_ms is not None
                and read.oldest_ms > period.start_ms
                and read.length >= TRIMMED_SHARE * config.ledger_max_len
            ),
        },
        "totals": everything.summary(),
        "tasks": _tasks(state, deps, view, moment),
        "dependencies": _dependencies(state, deps, breakers),
        "dlq": _dlq(everything, view, moment),
        "top_fingerprints": _fingerprints(view, config.top_fingerprints),
        "anomalies": sorted(
            state.anomalies.values(), key=lambda a: (-a["count"], a["task"], a["kind"])
        )[: config.max_listed],
        "spikes": [
            {
                "task": s.task,
                "at": iso(s.at),
                "retries_in_window": s.count,
                "expected": s.expected,
                "threshold": s.threshold,
                "window_seconds": s.window_seconds,
            }
            for s in state.spikes[: config.max_listed]
        ],
    }


def _read_ledger(store: Store, state: _Pass, read: LedgerRead) -> None:
    period, config = state.period, state.config
    tracker = RetryWindowTracker(clock=lambda: state.now)
    detector = RetryAnomalyDetector(config.anomalies, clock=lambda: state.now)
    since = period.start - config.lookback_seconds
    for record in ledger_records(store, store.keys.ledger, since, period.end, read):
        inside = period.holds_ms(record.ms)
        window = None
        if record.outcome != REDRIVEN:
            window = tracker.observe(
                record.task,
                record.task_id,
                record.outcome,
                record.attempt,
                record.at,
                record.duration,
            )
            if record.outcome == "retried":
                spike = state.spike_detector(record.task).record_retry(record.at)
                if spike is not None and inside:
                    state.spikes.append(spike)
        if not inside:
            continue
        state.records += 1
        totals = state.tasks.setdefault(record.task, Totals())
        totals.add(record)
        if window is not None:
            totals.add_window(window)
            if window.outcome not in DUPLICATES:
                for found in detector.record_window(window):
                    state.anomaly(found)


def _tasks(
    state: _Pass, deps: Mapping[str, str], view: DlqView, now: float
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for task in sorted(state.tasks):
        summary = state.tasks[task].summary(state.config.objectives.get(task))
        oldest = view.oldest_by_task.get(task)
        out[task] = {
            "dependency": deps.get(task),
            **summary,
            "dlq_oldest_age_seconds": round(now - oldest, 3) if oldest is not None else None,
        }
    return out


def _dependencies(
    state: _Pass, deps: Mapping[str, str], breakers: Mapping[str, BreakerStats]
) -> dict[str, dict[str, Any]]:
    merged: dict[str, Totals] = {}
    members: dict[str, list[str]] = {}
    for task, totals in state.tasks.items():
        dep = deps.get(task)
        if dep:
            merged.setdefault(dep, Totals()).merge(totals)
            members.setdefault(dep, []).append(task)
    out: dict[str, dict[str, Any]] = {}
    for dep in sorted(set(merged) | set(breakers)):
        stats = breakers.get(dep) or BreakerStats(dep)
        out[dep] = {
            "tasks": sorted(members.get(dep, [])),
            **(merged.get(dep) or Totals()).summary(),
            "breaker": stats.as_dict(),
        }
    return out


def _dlq(everything: Totals, view: DlqView, now: float) -> dict[str, Any]:
    return {
        "inflow": everything.outcomes["dead_lettered"],
        "outflow": everything.outcomes[REDRIVEN],
        "size": view.size,
        "oldest_entry_at": iso(view.oldest_at),
        "oldest_age_seconds": (
            round(now - view.oldest_at, 3) if view.oldest_at is not None else None
        ),
    }


def _fingerprints(view: DlqView, top: int) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for entry in view.in_period:
        key = entry.fingerprint
        group = groups.setdefault(
            key,
            {
                "fingerprint": key,
                "label": entry.label,
                "count": 0,
                "tasks": set(),
                "failure_classes": set(),
            },
        )
        group["count"] += 1
        group["tasks"].add(entry.task_name)
        group["failure_classes"].add(entry.failure_class)
    ranked = sorted(groups.values(), key=lambda g: (-g["count"], g["fingerprint"]))[:top]
    return [
        {**g, "tasks": sorted(g["tasks"]), "failure_classes": sorted(g["failure_classes"])}
        for g in ranked
    ]
