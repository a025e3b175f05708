"""Beat's schedule: every maintenance job, its task and its interval from settings.

Beat runs on celery-redbeat: the schedule lives in Redis under the service's key prefix
and a lock lets only one beat process send jobs; a second one waits and takes over
when the first stops renewing the lock. Each job also claims its schedule slot before
it works (:mod:`reliability.jobs`), so a job message that arrives twice for one slot
does its work once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redbeat import RedBeatScheduler

from config.settings import MaintenanceSettings, Settings
from reliability.errors import BackendUnavailable
from reliability.probes import BeatPulse, touch
from worker import embedded

log = structlog.get_logger("worker.schedule")

# A standby beat (waiting on redbeat's lock) touches its liveness file this often.
STANDBY_TOUCH_SECONDS = 1.0


@dataclass(frozen=True)
class Job:
    """One scheduled job: its name (in the job ledger), task and interval setting."""

    name: str
    task: str
    every: Callable[[MaintenanceSettings], float]


# Each job's task lives in worker/beat.py (or a module it imports).
JOBS: tuple[Job, ...] = (
    Job("dlq-cleanup", "maintenance.dlq_cleanup", lambda m: m.dlq_cleanup_seconds),
    Job("breaker-monitor", "maintenance.breaker_monitor", lambda m: m.breaker_monitor_seconds),
    Job("dlq-reprocess", "maintenance.dlq_reprocess", lambda m: m.dlq_reprocess_seconds),
    Job("report-hourly", "maintenance.report_hourly", lambda m: m.report_hourly_seconds),
    Job("report-daily", "maintenance.report_daily", lambda m: m.report_daily_seconds),
    Job(
        "degradation-evaluate", "maintenance.degradation_evaluate", lambda m: m.health_poll_seconds
    ),
    Job("health-poll", "maintenance.health_poll", lambda m: m.health_poll_seconds),
)


# Sent once when a beat becomes active (Scheduler._send_start_jobs).
START_JOBS = ("health-poll", "degradation-evaluate")


def job_named(name: str) -> Job:
    for job in JOBS:
        if job.name == name:
            return job
    raise KeyError(f"no maintenance job named {name!r}; known: {[j.name for j in JOBS]}")


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule`` for every job."""
    return {
        job.name: {"task": job.task, "schedule": float(job.every(settings.maintenance))}
        for job in JOBS
    }


def redbeat_config(settings: Settings, state_url: str) -> dict[str, Any]:
    """celery-redbeat's settings: its schedule and lock in the state store, under the
    service's key prefix (so test runs and deployments sharing a Redis never meet)."""
    return {
        "beat_scheduler": "worker.schedule:Scheduler",
        "redbeat_redis_url": state_url,
        "redbeat_key_prefix": f"{settings.redis.key_prefix}:redbeat:",
        "redbeat_lock_timeout": int(settings.maintenance.beat_lock_timeout_seconds),
        # Retry an unreachable Redis forever (a restart must not stop beat).
        "redbeat_redis_options": {
            "retry_period": -1,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
        },
        # Beat renews its lock every loop: at least five renewals per lock timeout.
        "beat_max_loop_interval": max(1, int(settings.maintenance.beat_lock_timeout_seconds / 5)),
    }


class Scheduler(RedBeatScheduler):  # type: ignore[misc]
    """celery-redbeat's scheduler, after the embedded Redis it needs is up, that shows it
    is alive on every tick.

    Celery builds the scheduler (which reads and writes its schedule in Redis) before it
    sends ``beat_init``; a standalone beat with no Redis URL must own the embedded
    server first (it stops the server when it exits, as a standalone worker does).

    Each tick touches the beat liveness file (``RELIABLE_HEALTH__BEAT_FILE``, for an exec
    probe) and sets beat's pulse in Redis (the health check's ``beat`` component). A
    standby beat waits on redbeat's lock in ``beat_init`` and does not tick: until its
    first tick a thread touches its file, so the probe does not restart a healthy standby.
    """

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        settings: Settings = app.settings
        if settings.redis.url is None:
            embedded.own_for_process(settings.redis.data_dir)
        super().__init__(app, *args, **kwargs)
        self._beat_file = settings.health.beat_file
        self._pulse = BeatPulse(app.reliability.store, settings.health.beat_stale_seconds)
        self._ticking = threading.Event()
        if self._beat_file:
            touch(self._beat_file)
            threading.Thread(target=self._standby, name="beat-standby", daemon=True).start()

    def _send_start_jobs(self) -> None:
        """Once this beat is the active one: the jobs an operator reads first (health, the
        degradation level) now, not one interval later. Each job runs once per schedule
        slot, so the scheduled send in the same slot does nothing twice."""
        for name in START_JOBS:
            task = job_named(name).task
            try:
                self.app.send_task(task)
            except Exception as exc:  # the broker away: the schedule sends it later anyway
                log.warning("beat_start_job_not_sent", job=name, error=str(exc))
            else:
                log.info("beat_start_job_sent", job=name)

    def _standby(self) -> None:
        while not self._ticking.wait(STANDBY_TOUCH_SECONDS):
            touch(self._beat_file)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        first = not self._ticking.is_set()
        delay: float = super().tick(*args, **kwargs)
        self._ticking.set()
        if first:
            self._send_start_jobs()
        if self._beat_file:
            touch(self._beat_file)
        try:
            self._pulse.beat()
        except BackendUnavailable as exc:
            log.warning("beat_pulse_failed", error=str(exc))
        return delay
