"""A worker shutdown that always ends: stuck tasks are killed and their messages handed back.

Celery's warm shutdown waits for running tasks without limit, and its cold shutdown
only sends SIGTERM to them — a pool child stuck in a C call that blocks signals (or
that catches SIGTERM) keeps either waiting until its hard time limit, minutes later.
This worker bootstep bounds both:

* **warm** (SIGTERM, the first Ctrl-C, or any other stop): running tasks get
  ``worker_soft_shutdown_timeout`` seconds, counted from the first shutdown signal, to
  finish; then each child still running one is sent SIGTERM, SIGKILL after
  :data:`KILL_GRACE_SECONDS`, and once it is dead its message is handed back to the
  broker unacked (``ReliableRequest.handed_back``: lease freed, ledger ``requeued``),
  so the next worker runs it;
* **cold** (SIGQUIT, the second Ctrl-C): the same at once, without waiting for the
  grace. Celery's own cold shutdown then finds nothing left to cancel. An idle worker
  does not wait at all (Celery's cold shutdown sleeps the whole timeout).

The killing runs on a thread of its own: the event loop may be blocked, and Celery's
signal handlers run on the main thread in the middle of whatever it was doing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

import structlog
from celery import bootsteps
from celery import signals as celery_signals
from celery.worker import state

log = structlog.get_logger("worker.shutdown")

# A child sent SIGTERM at the end of the grace is SIGKILLed this long after.
KILL_GRACE_SECONDS = 1.0
# The cold-shutdown signal handler waits at most this long for the kills and hand-backs
# (beyond KILL_GRACE_SECONDS) before Celery's own cold shutdown goes on.
COLD_WAIT_MARGIN_SECONDS = 5.0
POLL_SECONDS = 0.05


class ShutdownDeadline(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: after the grace (warm) or at once (cold), kill the children
    still running tasks and hand their messages back."""

    label = "ShutdownDeadline"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.grace_seconds = float(parent.app.conf.worker_soft_shutdown_timeout or 0)
        self._worker = parent
        self._deadline: float | None = None
        self._begun = threading.Event()
        self._cold = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        # Celery's cold shutdown (SIGQUIT, second Ctrl-C) calls this from its signal
        # handler before it cancels running tasks: kill and hand back now instead of
        # sleeping the whole soft-shutdown timeout.
        parent.wait_for_soft_shutdown = self.cold
        celery_signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)
        self._thread = threading.Thread(target=self._watch, name="shutdown-deadline", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self.warm()

    def terminate(self, parent: Any) -> None:
        self.cold()

    # -- triggers (may run inside a signal handler: no I/O, no logging) -----------------

    def _on_shutting_down(self, how: str = "Warm", **_: Any) -> None:
        if how == "Cold":
            self._cold.set()
        self.warm()

    def warm(self) -> None:
        """Start the grace, once: running tasks have until its end."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.grace_seconds
        self._begun.set()

    def cold(self) -> None:
        """Kill and hand back now; wait (bounded) until that is done."""
        self._cold.set()
        self.warm()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._done.wait(KILL_GRACE_SECONDS + COLD_WAIT_MARGIN_SECONDS)

    # -- the watchdog thread -------------------------------------------------------------

    def _watch(self) -> None:
        self._begun.wait()
        assert self._deadline is not None
        while not self._cold.is_set() and (left := self._deadline - time.monotonic()) > 0:
            self._cold.wait(left)
        try:
            running = self._running()
            if running:
                self._abandon(running)
        except Exception as exc:  # the watchdog must never die silently
            log.exception("shutdown_hand_back_failed", error=str(exc))
        finally:
            self._done.set()

    def _running(self) -> list[Any]:
        """Requests a pool child is running whose message is still unacked."""
        return [
            r
            for r in list(state.active_requests)
            if r.worker_pid and not r.acknowledged and r.id not in state.successful_requests
        ]

    def _abandon(self, requests: list[Any]) -> None:
        started = time.monotonic()
        pool = self._worker.pool
        for request in requests:
            # Celery reads a child killed on purpose as a revoke unless it is cancelled.
            request._already_cancelled = True
        pids = {request.worker_pid for request in requests}
        for pid in pids:
            _terminate(pool, pid, signal.SIGTERM)
        alive = _wait_exit(pids, KILL_GRACE_SECONDS)
        for pid in alive:
            _terminate(pool, pid, signal.SIGKILL)
        still = _wait_exit(alive, KILL_GRACE_SECONDS)
        for request in requests:
            if request.worker_pid in still:
                continue  # not dead: leave the message unacked (restored on channel close)
            try:
                handed_back = getattr(request, "handed_back", None)
                if handed_back is not None:
                    handed_back()
                elif not request.acknowledged:
                    request.acknowledged = True
                    request._message.reject(requeue=True)
            except Exception as exc:
                log.exception("shutdown_hand_back_failed", task_id=request.id, error=str(exc))
        log.warning(
            "shutdown_tasks_handed_back",
            tasks=[request.id for request in requests],
            killed=sorted(alive),
            cold=self._cold.is_set(),
            grace_seconds=self.grace_seconds,
            seconds=round(time.monotonic() - started, 3),
        )


def _terminate(pool: Any, pid: int, sig: int) -> None:
    """Signal a pool child through the pool, so billiard reports its job as terminated
    (at once) rather than lost (after its lost-worker timeout)."""
    with contextlib.suppress(OSError, AttributeError):
        pool.terminate_job(pid, sig)
    # The pool may have let go of it already; a dead but unreaped child keeps its pid.
    if sig == signal.SIGKILL and _alive(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    """Whether our child ``pid`` has not exited yet (without reaping it)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False  # already reaped by the pool


def _wait_exit(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait up to ``timeout`` for the children to exit; the ones still alive."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = {pid for pid in pending if _alive(pid)}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    return pending
