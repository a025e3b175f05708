"""Beat jobs: periodic maintenance that runs as ordinary tasks on the fleet."""

from __future__ import annotations

import time

from reliability.dlq import Filter
from worker.app import app, runtime, settings


@app.task(name="maintenance.dlq_cleanup")
def dlq_cleanup(max_age_days: int | None = None) -> int:
    """Purge DLQ entries older than the retention policy; returns how many."""
    days = max_age_days or settings.dlq.max_age_days
    return runtime.dlq.purge(Filter(until=time.time() - days * 86400))
