"""The reliability report's wiring: its settings, its tasks' dependencies, its store.

The library (:mod:`reliability.reports`) reads no settings and no tasks; this module
hands it the report configuration from ``settings.reports`` and the map of task name ->
the breaker it declares (the task's dependency).
"""

from __future__ import annotations

from typing import Any

from config import Settings
from reliability.analytics import AnomalyThresholds
from reliability.reports import DAY, HOUR, Period, ReportConfig, ReportStore, write_report
from reliability.runtime import Runtime
from reliability.store import Store
from worker.alerting import alert_hooks


def report_config(settings: Settings) -> ReportConfig:
    r = settings.reports
    return ReportConfig(
        lookback_seconds=r.lookback_seconds,
        top_fingerprints=r.top_fingerprints,
        anomalies=AnomalyThresholds(
            retry_rate=r.anomaly_retry_rate,
            min_attempts=r.anomaly_min_attempts,
            window_seconds=r.anomaly_window_seconds,
            attempts=r.anomaly_attempts,
        ),
        spike_window_seconds=r.spike_window_seconds,
        spike_baseline_seconds=r.spike_baseline_seconds,
        spike_multiplier=r.spike_multiplier,
        spike_min_retries=r.spike_min_retries,
        objectives=dict(r.objectives),
        ledger_max_len=settings.ledger.max_len,
    )


def report_store(store: Store, settings: Settings) -> ReportStore:
    r = settings.reports
    return ReportStore(store, {HOUR: r.hourly_retention, DAY: r.daily_retention})


def dependencies(app: Any) -> dict[str, str]:
    """Each reliable task's dependency: the breaker it declares."""
    found: dict[str, str] = {}
    for name, task in app.tasks.items():
        spec = getattr(task, "spec", None)
        breaker = spec.option("breaker") if spec is not None else None
        if breaker:
            found[name] = str(breaker)
    return found


def every(settings: Settings, period: str) -> float:
    m = settings.maintenance
    return m.report_hourly_seconds if period == HOUR else m.report_daily_seconds


def report_for_slot(
    app: Any, runtime: Runtime, settings: Settings, period: str, slot: int
) -> dict[str, Any]:
    """Write the report of the period that ended when ``slot`` began; its anomalies and
    spikes go to the service's alert hooks (:mod:`worker.alerting`)."""
    return write_report(
        runtime.store,
        report_store(runtime.store, settings),
        Period.of_slot(period, every(settings, period), slot),
        dependencies=dependencies(app),
        config=report_config(settings),
        hooks=alert_hooks(settings, runtime),
    )
