"""``reliable run``'s supervisor: keeps the service's processes up, or stops them all.

Each child (worker, beat, sandbox) runs in its own process group, so the terminal's
Ctrl-C reaches only the supervisor, which forwards it deliberately:

* a child that exits unexpectedly is restarted after a backoff (0.5 s, doubling, at most
  10 s), with one log line each time; a child that dies ``max_deaths`` times within
  ``window_seconds``, or exits with :data:`~worker.preflight.EX_CONFIG` (broken
  configuration: restarting cannot help), makes the supervisor stop everything and exit
  non-zero — the service is never left up with nothing consuming;
* the first Ctrl-C / SIGTERM / SIGHUP is a warm shutdown (SIGTERM to each child: Celery
  finishes running tasks); a second one is a cold shutdown (the worker gets SIGQUIT —
  Celery cancels running tasks after its soft-shutdown grace and hands their messages
  back —, the others SIGKILL); a third SIGKILLs every process group it started. A
  shutdown step the children have not finished within ``grace_seconds`` escalates by
  itself, so stopping always ends, and nothing it started outlives it;
* programs marked ``stops_last`` (beat, the sandbox provider the tasks call) are stopped
  only once every other program (the workers) has exited: a task finishing in the
  worker's grace can still call the sandbox instead of failing and being retried.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from worker.preflight import EX_CONFIG

# Restart backoff: the first restart waits this long, each further one twice as long.
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
# A child dying this many times within the window makes the supervisor give up.
MAX_DEATHS = 5
WINDOW_SECONDS = 60.0
POLL_SECONDS = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Program:
    """One process the supervisor runs: its name, command line and cold-stop signal."""

    name: str
    argv: list[str]
    cold_signal: int = signal.SIGKILL  # Celery workers: SIGQUIT (cold shutdown)
    stops_last: bool = False  # stopped only after the other programs exited
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's


@dataclass
class _Child:
    program: Program
    proc: subprocess.Popen[bytes] | None = None
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _say(message: str) -> None:
    """One line on stderr. A terminal or pipe that is gone (``| tee`` dies with the same
    Ctrl-C) must not turn a warm shutdown into a crash that kills every child."""
    with contextlib.suppress(OSError):  # BrokenPipeError included
        print(f"reliable run: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Start ``programs``, keep them up, stop them on request; :meth:`run` blocks."""

    def __init__(
        self,
        programs: list[Program],
        env: dict[str, str],
        *,
        max_deaths: int = MAX_DEATHS,
        window_seconds: float = WINDOW_SECONDS,
        grace_seconds: float = 40.0,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.children = [_Child(p) for p in programs]
        self.env = env
        self.max_deaths = max(1, max_deaths)
        self.window_seconds = window_seconds
        self.grace_seconds = grace_seconds
        self.say = say
        self._signals = 0  # stop signals received (only the handler writes it)
        self._seen = 0  # stop signals acted on
        self._level = 0  # 0 running, 1 warm shutdown, 2 cold shutdown, 3 killed
        self._deadline: float | None = None  # when the shutdown escalates by itself
        self._last_stopped_at = 0  # the shutdown level at which stops_last children were
        self._code = 0

    def run(self) -> int:
        """Supervise until stopped (0), a child keeps dying (1) or is misconfigured (78)."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        try:
            for child in self.children:
                self._start(child)
            while not self._finished():
                self._step()
                time.sleep(POLL_SECONDS)
        finally:
            self._kill_leftovers()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._code

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1

    @property
    def stopping(self) -> bool:
        return self._level > 0

    def _finished(self) -> bool:
        return self.stopping and all(
            c.proc is None or c.proc.poll() is not None for c in self.children
        )

    def _step(self) -> None:
        while self._seen < self._signals:
            self._seen += 1
            self._escalate("on request")
        if self.stopping:
            self._stop_last()
            if self._deadline is not None and time.monotonic() > self._deadline:
                self._escalate(f"(still running after {self.grace_seconds:.0f} s)")
            return
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                self._died(child, now)
                if self.stopping:
                    return
            elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                self._start(child)

    def _died(self, child: _Child, now: float) -> None:
        assert child.proc is not None
        code, pid = child.proc.returncode, child.proc.pid
        self._kill_group(pid)  # its own pool children must not outlive it
        child.proc = None
        name = child.program.name
        if code == EX_CONFIG:
            self.say(f"{name} (pid {pid}) refused its configuration; stopping everything")
            self._code = EX_CONFIG
            self._stop_all()
            return
        child.deaths.append(now)
        while child.deaths and now - child.deaths[0] > self.window_seconds:
            child.deaths.popleft()
        died = len(child.deaths)
        if died >= self.max_deaths:
            self.say(
                f"{name} (pid {pid}) {_describe(code)}; it died {died} times in "
                f"{self.window_seconds:.0f} s: giving up, stopping everything"
            )
            self._code = 1
            self._stop_all()
            return
        delay = min(BACKOFF_FIRST_SECONDS * 2 ** (died - 1), BACKOFF_MAX_SECONDS)
        self.say(
            f"{name} (pid {pid}) {_describe(code)}; restarting in {delay:.1f} s "
            f"({died} of {self.max_deaths} deaths allowed in {self.window_seconds:.0f} s)"
        )
        child.restart_at = now + delay

    def _start(self, child: _Child) -> None:
        child.restart_at = None
        # Its own process group: the terminal's Ctrl-C reaches only the supervisor.
        env = {**(os.environ if self.env is None else self.env), **child.program.env}
        child.proc = subprocess.Popen(child.program.argv, env=env, process_group=0)

    def _stop_all(self) -> None:
        """Stop on the supervisor's own decision: as the first Ctrl-C would."""
        self._escalate("")

    def _escalate(self, why: str) -> None:
        """One step further: warm shutdown, cold shutdown, kill. Each of the first two
        escalates by itself after ``grace_seconds``."""
        self._level = min(self._level + 1, 3)
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in self.children:
            child.restart_at = None
        self._deadline = time.monotonic() + self.grace_seconds
        if self._level == 1:
            if why:
                self.say(f"warm shutdown {why} (Ctrl-C again for a cold shutdown)")
        elif self._level == 2:
            self.say(f"cold shutdown {why} (Ctrl-C again to kill)")
        else:
            self.say(f"killing every process {why}")
            self._deadline = None
            self._signal_groups(signal.SIGKILL)
            return
        for child in running:
            if not child.program.stops_last:
                self._signal(child, self._stop_signal(child))
        self._stop_last()

    def _stop_signal(self, child: _Child) -> int:
        return signal.SIGTERM if self._level == 1 else child.program.cold_signal

    def _stop_last(self) -> None:
        """Once the other programs have exited, stop the ``stops_last`` ones (at the
        current level; their grace counts from now)."""
        if self._last_stopped_at >= self._level or self._level >= 3:
            return
        if any(
            c.proc is not None and c.proc.poll() is None and not c.program.stops_last
            for c in self.children
        ):
            return
        self._last_stopped_at = self._level
        last = [
            c
            for c in self.children
            if c.program.stops_last and c.proc is not None and c.proc.poll() is None
        ]
        if not last:
            return
        if self._level == 1 and len(last) < len(self.children):
            self.say(
                f"stopping {', '.join(c.program.name for c in last)} "
                f"(the other processes have exited)"
            )
        self._deadline = time.monotonic() + self.grace_seconds
        for child in last:
            self._signal(child, self._stop_signal(child))

    def _signal(self, child: _Child, sig: int) -> None:
        if child.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)

    def _signal_groups(self, sig: int) -> None:
        for child in self.children:
            if child.proc is not None:
                self._kill_group(child.proc.pid, sig)

    @staticmethod
    def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
        # The kernel never reuses a pid while a process group of that id has members, so
        # this reaches only what the child left behind (or nothing: ESRCH).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def _kill_leftovers(self) -> None:
        for child in self.children:
            if child.proc is None:
                continue
            if child.proc.poll() is None:
                self._kill_group(child.proc.pid)
                child.proc.wait()
            self._kill_group(child.proc.pid)
