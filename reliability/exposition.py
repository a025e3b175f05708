"""One way to expose metrics, shared by the worker's main process and the ops service.

With ``PROMETHEUS_MULTIPROC_DIR`` set (:mod:`worker.multiproc`) the exposition is the
sum over every process's files in that directory (prometheus-client's
``MultiProcessCollector``: the main process and each pool child, live or dead — a dead
child's counts still count); without it, this process's own default registry. Extra
collectors (the ops service's :class:`~reliability.fleet_metrics.FleetCollector`) are
added to the same registry, so one scrape holds both.

A pool child that dies — even by SIGKILL, when no exit hook of its own runs — leaves its
*live* gauge files (``multiprocess_mode`` ``live*``) behind, and they would keep being
summed: :func:`sweep_dead` calls prometheus-client's ``mark_process_dead`` for every pid
in the directory that no longer runs. It runs before every scrape and on a timer in the
worker's main process (:class:`MetricsServer`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from reliability.processes import process_alive

log = structlog.get_logger("reliability.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
_PID = re.compile(r"_(\d+)\.db$")


def multiproc_dir() -> str | None:
    return os.environ.get(ENV) or None


def sweep_dead(path: str | None = None) -> list[int]:
    """``mark_process_dead`` for every process with files in ``path`` that is gone; the
    pids swept (their counters stay: a dead child's counts are part of the totals)."""
    path = path or multiproc_dir()
    if path is None:
        return []
    pids = set()
    for name in os.listdir(path):
        if name.startswith("gauge_live") and (found := _PID.search(name)):
            pids.add(int(found.group(1)))
    dead = sorted(pid for pid in pids if not process_alive(pid))
    for pid in dead:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    return dead


class _Sweeping(Collector):
    """The multiprocess sum, read after the dead processes' live gauges were removed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.inner = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Any]:
        sweep_dead(self.path)
        found: Iterable[Any] = self.inner.collect()  # type: ignore[no-untyped-call]
        return found


class _Default(Collector):
    """This process's own default registry (single-process mode)."""

    def collect(self) -> Iterable[Any]:
        return REGISTRY.collect()


def registry(*collectors: Collector) -> CollectorRegistry:
    """A registry holding this deployment's per-process metrics plus ``collectors``."""
    found = CollectorRegistry(auto_describe=False)
    path = multiproc_dir()
    found.register(_Sweeping(path) if path else _Default())
    for collector in collectors:
        found.register(collector)
    return found


def render(reg: CollectorRegistry) -> bytes:
    """The text exposition of ``reg``."""
    return generate_latest(reg)


class MetricsServer:
    """prometheus-client's own HTTP server on ``host:port``, serving :func:`registry`.

    A port in use is one clear log line (the worker runs on without it), never a crash.
    While it runs, dead processes' live gauges are swept every ``sweep_seconds`` too.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", sweep_seconds: float = 5.0) -> None:
        self.port, self.host, self.sweep_seconds = port, host, sweep_seconds
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> bool:
        """Serve; False when the port could not be bound (logged)."""
        try:
            self._server, self._thread = start_http_server(self.port, self.host, registry())
        except OSError as exc:
            log.error(
                "metrics_port_unavailable",
                host=self.host,
                port=self.port,
                error=str(exc),
                hint="set RELIABLE_METRICS__PORT to a free port (0 turns the server off)",
            )
            return False
        log.info(
            "metrics_server_started", host=self.host, port=self.port, multiproc=multiproc_dir()
        )
        if multiproc_dir():
            self._sweeper = threading.Thread(
                target=self._sweep, name="reliable-metrics-sweep", daemon=True
            )
            self._sweeper.start()
        return True

    def _sweep(self) -> None:
        while not self._stopping.wait(self.sweep_seconds):
            try:
                sweep_dead()
            except OSError:
                log.exception("metrics_sweep_failed")

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        log.info("metrics_server_stopped", port=self.port)
