"""Processes a test starts and must see end: ``reliable run``, embedded Redis servers.

:class:`ReliableRun` runs ``reliable run`` as a terminal does — the leader of its own
process group, the foreground job that Ctrl-C (SIGINT to the group) reaches — and keeps
every descendant it ever saw, so a test can check that none outlives it and the fixture
can kill them if the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from tests.support.fleet import ROOT, Environment, wait_until
from worker import embedded


def no_url_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """A test environment with no Redis URL: the embedded Redis on ``data_dir``."""
    env = Environment(redis_url="unused").env(RELIABLE_REDIS__DATA_DIR=str(data_dir), **overrides)
    del env["RELIABLE_REDIS__URL"]
    return env


def servers_on(data_dir: Path) -> list[psutil.Process]:
    """Running redis-server processes on the data directory's socket (by process title)."""
    socket = embedded.embedded_url(data_dir).removeprefix("unix://")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if socket in " ".join(process.info["cmdline"] or ()) and process.is_running():
                found.append(process)
    return found


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (an exited process awaiting its reaper does not count)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


class ReliableRun:
    """``reliable run <args>`` in its own process group, output in ``log_path``."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *args: str, data_dir: Path | None = None
    ) -> None:
        self.env = env
        self.args = args
        self.log_path = log_path
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, psutil.Process] = {}

    def __enter__(self) -> ReliableRun:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run", *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        """Whatever the test did, nothing it started survives it."""
        if self.proc is not None and self.proc.poll() is None:
            self.look()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for process in alive(list(self.seen.values())):
            with contextlib.suppress(psutil.Error):
                process.kill()
        if self.data_dir is not None:
            embedded.stop_embedded_redis(self.data_dir)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def look(self) -> list[psutil.Process]:
        """Its descendants now (and remember them), plus the embedded Redis if any."""
        found: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            found = psutil.Process(self.pid).children(recursive=True)
        if self.data_dir is not None:
            found += servers_on(self.data_dir)
        for process in found:
            self.seen.setdefault(process.pid, process)
        return found

    def wait_log(self, text: str, count: int = 1, timeout: float = 60.0) -> None:
        def logged() -> bool:
            self.look()
            return self.log().count(text) >= count

        try:
            wait_until(logged, timeout, interval=0.1, message=f"{text!r} x{count} in the log")
        except AssertionError:
            raise AssertionError(f"{text!r} x{count} not logged:\n{self.log()[-4000:]}") from None

    def child(self, word: str) -> psutil.Process:
        """Its direct child whose command line has ``word`` (``worker``, ``beat``)."""
        [found] = [p for p in psutil.Process(self.pid).children() if word in p.cmdline()]
        return found

    def ctrl_c(self) -> None:
        """What the terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.pid, signal.SIGINT)

    def wait_exit(self, timeout: float) -> int:
        """Its exit status, watching its descendants until then."""
        assert self.proc is not None
        proc = self.proc

        def exited() -> bool:
            self.look()
            return proc.poll() is not None

        try:
            wait_until(exited, timeout, interval=0.1, message="reliable run to exit")
        except AssertionError:
            raise AssertionError(
                f"reliable run still running after {timeout}s:\n{self.log()[-4000:]}"
            ) from None
        return int(proc.returncode)
