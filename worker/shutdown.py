"""A worker shutdown that always ends: stuck tasks are killed and their messages handed back.

Celery's warm shutdown waits for running tasks without limit, and its cold shutdown
only sends SIGTERM to them — a pool child stuck in a C call that blocks signals (or
that catches SIGTERM) keeps either waiting until its hard time limit, minutes later.
This worker bootstep bounds both:

* **warm** (SIGTERM, the first Ctrl-C, or any other stop): running tasks get
  ``worker_soft_shutdown_timeout`` seconds, counted from the first shutdown signal, to
  finish; then each child still running one is sent SIGTERM, SIGKILL after
  :data:`KILL_GRACE_SECONDS`, and when the pool reports its job ended, its message is
  handed back to the broker unacked (``ReliableRequest.abandon``: lease freed, ledger
  ``requeued``), so the next worker runs it — unless the child's result came in first;
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
        summary: dict[str, Any] | None = None
        try:
            running = self._running()
            if running:
                summary = self._abandon(running)
        except Exception as exc:  # the watchdog must never die silently
            log.exception("shutdown_kill_failed", error=str(exc))
        finally:
            # Before logging: a cold shutdown's signal handler waits for this, and the main
            # thread it interrupted may hold the log handler's lock.
            self._done.set()
        if summary is not None:
            log.warning("shutdown_tasks_killed", **summary)

    def _running(self) -> list[Any]:
        """Requests a live pool child of ours is running (not ones whose result is in)."""
        return [
            r
            for r in _snapshot(state.active_requests)
            if r.worker_pid
            and r.worker_pid != os.getpid()  # solo/threads pools: nothing to kill
            and r.id not in state.successful_requests
            and _alive(r.worker_pid)
        ]

    def _abandon(self, requests: list[Any]) -> dict[str, Any]:
        started = time.monotonic()
        pool = self._worker.pool
        # Unacked messages go back to the broker. An acked one (a task without acks_late)
        # cannot: its child is killed all the same, and Celery records it as revoked.
        unacked = [request for request in requests if not request.acknowledged]
        for request in unacked:
            abandon = getattr(request, "abandon", None)
            if abandon is not None:
                abandon()  # ReliableRequest: hands the message back once the job ends
            else:
                # Plain Celery request: left unacked, restored when the channel closes.
                request._already_cancelled = True
        pids = {request.worker_pid for request in requests}
        for pid in pids:
            _terminate(pool, pid, signal.SIGTERM)
        sigkilled = _wait_exit(pids, KILL_GRACE_SECONDS)
        for pid in sigkilled:
            _terminate(pool, pid, signal.SIGKILL)
        survivors = _wait_exit(sigkilled, KILL_GRACE_SECONDS)
        return {
            "handed_back": [request.id for request in unacked],
            "killed_acked": [request.id for request in requests if request not in unacked],
            "sigkilled": sorted(sigkilled),
            "survivors": sorted(survivors),
            "cold": self._cold.is_set(),
            "grace_seconds": self.grace_seconds,
            "seconds": round(time.monotonic() - started, 3),
        }


def _snapshot(requests: Any) -> list[Any]:
    """A copy of Celery's set of active requests, which the main thread may be changing."""
    for _ in range(100):
        try:
            return list(requests)
        except RuntimeError:  # changed size during iteration
            time.sleep(0.001)
    return []


def _terminate(pool: Any, pid: int, sig: int) -> None:
    """Signal a pool child through the pool, so billiard reports its job as terminated
    (at once) rather than lost (after its lost-worker timeout)."""
    with contextlib.suppress(Exception):
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
