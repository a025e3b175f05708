"""Beat jobs: periodic maintenance that runs as ordinary tasks on the fleet.

Each job runs through :class:`reliability.jobs.Jobs`: it claims its schedule slot first,
so a job message that arrives twice for one slot does its work once, and every run is
recorded in the job ledger (``reliable jobs``). ``slot`` is for operators and tests
running a job by hand for a given slot; beat sends none (the current slot is used).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from reliability.breaker.monitor import BreakerMonitor, MonitorPolicy
from reliability.degradation import DegradationState, breaker_snapshots
from reliability.dlq import Filter
from reliability.jobs import JobResult, Jobs, slot_of
from reliability.reports import DAY, HOUR
from worker import health
from worker.alerting import alert_hooks
from worker.app import app, runtime, settings
from worker.celeryconfig import degradation_rules
from worker.reporting import every, report_for_slot
from worker.reprocess import reprocessor
from worker.schedule import job_named

jobs = Jobs(runtime.store, runtime.masker, settings.maintenance.job_history)


def run_job(name: str, work: Callable[[], JobResult], slot: int | None = None) -> dict[str, Any]:
    """Run the job ``name`` once for its slot; what the run did (``ran: False`` when the
    slot had already run)."""
    every = job_named(name).every(settings.maintenance)
    run = jobs.run_once(name, every, work, slot=slot)
    if run is None:
        return {"ran": False}
    return {"ran": True, "slot": run.slot, "status": run.status, **run.result}


@app.task(name="maintenance.dlq_cleanup")
def dlq_cleanup(max_age_days: int | None = None, slot: int | None = None) -> dict[str, Any]:
    """Purge DLQ entries older than the retention policy."""
    days = max_age_days or settings.dlq.max_age_days

    def work() -> JobResult:
        return {"purged": runtime.dlq.purge(Filter(until=time.time() - days * 86400))}

    return run_job("dlq-cleanup", work, slot)


@functools.cache
def breaker_monitor_of_process() -> BreakerMonitor:
    """The process's breaker monitor, over every breaker the runtime knows."""
    m = settings.monitor
    policy = MonitorPolicy(
        m.open_alert_seconds, m.flaps_per_hour, m.history_seconds, m.history_max_entries
    )
    return BreakerMonitor(runtime.store, runtime.breakers, alert_hooks(settings, runtime), policy)


@app.task(name="maintenance.breaker_monitor")
def breaker_monitor(slot: int | None = None) -> dict[str, Any]:
    """Snapshot every breaker (with history); alert once per open-too-long or flapping episode."""
    return run_job("breaker-monitor", lambda: breaker_monitor_of_process().run(), slot)


@app.task(name="maintenance.dlq_reprocess")
def dlq_reprocess(slot: int | None = None) -> dict[str, Any]:
    """Redrive the DLQ by policy; hold, and alert once on, what needs an operator."""
    work = reprocessor(app, runtime, settings, by=f"job:dlq-reprocess@{jobs.identity}")
    return run_job("dlq-reprocess", lambda: work.run().summary(), slot)


@app.task(name="maintenance.report_hourly")
def report_hourly(slot: int | None = None) -> dict[str, Any]:
    """Write the reliability report of the previous complete hour (the period that ended
    when this run's slot began)."""
    slot = slot_of(time.time(), every(settings, HOUR)) if slot is None else slot
    return run_job(
        "report-hourly", lambda: report_for_slot(app, runtime, settings, HOUR, slot), slot
    )


@app.task(name="maintenance.report_daily")
def report_daily(slot: int | None = None) -> dict[str, Any]:
    """Write the reliability report of the previous complete day (UTC)."""
    slot = slot_of(time.time(), every(settings, DAY)) if slot is None else slot
    return run_job("report-daily", lambda: report_for_slot(app, runtime, settings, DAY, slot), slot)


@app.task(name="maintenance.degradation_evaluate")
def degradation_evaluate(slot: int | None = None) -> dict[str, Any]:
    """Compute the degradation level from health and breaker states; write it, and log
    and alert a change."""
    state = DegradationState(runtime.store, alert_hooks(settings, runtime))
    return run_job(
        "degradation-evaluate",
        lambda: state.evaluate(
            degradation_rules(settings),
            breaker_snapshots(runtime.breakers),
            max_age=settings.degradation.health_max_age_seconds,
        ),
        slot,
    )


@app.task(name="maintenance.health_poll")
def health_poll(slot: int | None = None) -> dict[str, Any]:
    """Check every component and store the results (``P:health`` and its history)."""
    return run_job("health-poll", lambda: health.poll(settings, runtime), slot)
