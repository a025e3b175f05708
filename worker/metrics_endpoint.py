"""The worker's own ``/metrics``: served from its main process (README, Metrics).

A worker bootstep starts prometheus-client's HTTP server on ``RELIABLE_METRICS__HOST``:
``__PORT`` (0 = off) once the pool is up, and stops it at shutdown. It serves the sum of
the main process's and every pool child's multiprocess files
(:mod:`reliability.exposition`); a port already in use is logged, and the worker runs on.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from reliability.exposition import MetricsServer


class MetricsEndpoint(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: the metrics HTTP server of this worker's main process."""

    label = "MetricsEndpoint"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        settings = parent.app.settings.metrics
        self.server = MetricsServer(settings.port, settings.host)

    def include_if(self, parent: Any) -> bool:
        return bool(self.server.port)

    def start(self, parent: Any) -> None:
        self.server.start()

    def stop(self, parent: Any) -> None:
        if self.server.running:
            self.server.stop()

    shutdown = stop
