"""Beat jobs: periodic maintenance that runs as ordinary tasks on the fleet.

Each job runs through :class:`reliability.jobs.Jobs`: it claims its schedule slot first,
so a job message that arrives twice for one slot does its work once, and every run is
recorded in the job ledger (``reliable jobs``). ``slot`` is for operators and tests
running a job by hand for a given slot; beat sends none (the current slot is used).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from reliability.dlq import Filter
from reliability.jobs import JobResult, Jobs
from worker import health
from worker.app import app, runtime, settings
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


@app.task(name="maintenance.health_poll")
def health_poll(slot: int | None = None) -> dict[str, Any]:
    """Check every component and store the results (``P:health`` and its history)."""
    return run_job("health-poll", lambda: health.poll(settings, runtime), slot)
