"""The worker's liveness file, for a Kubernetes exec liveness probe.

A worker bootstep touches ``RELIABLE_HEALTH__WORKER_FILE`` when the worker starts and
then every ``RELIABLE_HEALTH__WORKER_FILE_TOUCH_SECONDS`` from the worker's timer. With
the event loop (prefork on Redis or RabbitMQ) that timer is driven by the consumer's
loop on the main thread, so the file goes stale when the loop stops turning — a hung
main process, SIGSTOP, a dead worker — and not merely when the process is gone. A
broker outage also stops the loop while the worker reconnects: give the probe a
failure window longer than the outages the worker should ride out (README, "Health and
Kubernetes probes"). The file is left in place at shutdown (the probe reads its age,
and a stopped worker's file goes stale by itself).
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import bootsteps

from reliability.probes import touch

log = structlog.get_logger("worker.liveness")


class LivenessFile(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: touch the liveness file on start and on every timer interval."""

    label = "LivenessFile"
    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        health = parent.app.settings.health
        self.path: str = health.worker_file
        self.every: float = health.worker_file_touch_seconds
        self._tref: Any = None

    def include_if(self, parent: Any) -> bool:
        return bool(self.path)

    def start(self, parent: Any) -> None:
        self._touch()
        self._tref = parent.timer.call_repeatedly(self.every, self._touch, priority=10)

    def stop(self, parent: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def _touch(self) -> None:
        try:
            touch(self.path)
        except OSError as exc:  # a read-only or missing volume: say so, keep working
            log.warning("liveness_file_not_touched", path=self.path, error=str(exc))
