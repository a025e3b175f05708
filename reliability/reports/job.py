"""The report job's work: build a period's report, store it, raise its alerts.

Beat runs it hourly and daily (``maintenance.report_hourly`` / ``report_daily``), each
run claiming its schedule slot (:mod:`reliability.jobs`), so a period's alerts are
raised once. Anomalies and spikes go through the alert hooks as ``retry_anomaly`` and
``retry_spike`` (one per anomaly group and per spike); a failing hook never fails the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reliability.alerts import AlertHooks
from reliability.reports.builder import ReportConfig, build_report
from reliability.reports.period import Period
from reliability.reports.storage import ReportStore
from reliability.store import Store


def write_report(
    store: Store,
    archive: ReportStore,
    period: Period,
    *,
    dependencies: Mapping[str, str] | None = None,
    config: ReportConfig | None = None,
    hooks: AlertHooks | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Build and store ``period``'s report; a short summary for the job ledger."""
    report = build_report(store, period, dependencies=dependencies, config=config, now=now)
    dropped = archive.save(period, report)
    if hooks is not None:
        for anomaly in report["anomalies"]:
            hooks.emit(
                "retry_anomaly",
                anomaly["message"],
                {
                    "period": period.name,
                    "start": report["start"],
                    **{k: v for k, v in anomaly.items() if k != "message"},
                },
            )
        for spike in report["spikes"]:
            hooks.emit(
                "retry_spike",
                f"{spike['task']}: {spike['retries_in_window']} retries in"
                f" {spike['window_seconds']:g} s (threshold {spike['threshold']:g})",
                {"period": period.name, "start": report["start"], **spike},
            )
    totals = report["totals"]
    return {
        "period": period.name,
        "start": report["start"],
        "tasks": len(report["tasks"]),
        "received": totals["received"],
        "dead_lettered": totals["dead_lettered"],
        "anomalies": len(report["anomalies"]),
        "spikes": len(report["spikes"]),
        "reports_dropped": dropped,
    }
