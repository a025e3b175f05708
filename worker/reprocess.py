"""The DLQ reprocessor as the beat job and ``reliable dlq reprocess`` build it from settings.

The library (:mod:`reliability.reprocess`) reads no settings: here the policy comes from
``RELIABLE_REPROCESS__*`` and ``RELIABLE_DLQ__*``, each task's breaker and rate limits
from its registered spec, and held entries are alerted through the hooks built from
settings (:mod:`worker.alerting`).
"""

from __future__ import annotations

import structlog
from celery import Celery

from config import Settings
from reliability.gates import TaskGates
from reliability.reprocess import Reprocessor, ReprocessPolicy
from reliability.runtime import Runtime
from worker.alerting import alert_hooks

log = structlog.get_logger("worker.reprocess")


def policy(settings: Settings) -> ReprocessPolicy:
    r = settings.reprocess
    return ReprocessPolicy(
        backoff_base_seconds=r.backoff_base_seconds,
        backoff_max_seconds=r.backoff_max_seconds,
        max_per_run=r.max_per_run,
        claim_seconds=r.claim_seconds,
        alert_marker_seconds=settings.dlq.max_age_days * 86_400,
    )


def reprocessor(
    app: Celery, runtime: Runtime, settings: Settings, by: str, *, log: bool = True
) -> Reprocessor:
    """A reprocessor publishing through ``app``, recording its redrives as done ``by``."""

    def gates(task_name: str) -> TaskGates:
        spec = getattr(app.tasks.get(task_name), "spec", None)
        return TaskGates.of(spec, runtime.rate_limits)

    return Reprocessor(
        runtime.dlq,
        runtime.breakers,
        app,
        gates=gates,
        hooks=alert_hooks(settings, runtime, log=log),
        masker=runtime.masker,
        policy=policy(settings),
        by=by,
    )
