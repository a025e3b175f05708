"""A daemon thread that runs one function every few seconds until stopped.

For background work that must not hold up anything else: breaker transitions are
delivered to alert hooks (a webhook may take seconds) on their own thread, not on the
maintenance leader's, whose lease and mover must keep their pace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("reliability.periodic")


class Periodic(threading.Thread):
    """Calls ``fn`` every ``interval`` seconds; an exception is logged, never fatal."""

    def __init__(self, name: str, fn: Callable[[], object], interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.interval = interval
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.fn()
            except Exception:
                log.exception("periodic_failed", thread=self.name)
            self._stopping.wait(self.interval)
