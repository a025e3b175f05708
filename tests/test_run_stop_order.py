"""On Ctrl-C the supervisor stops the workers first, and what they call only after them.

``reliable run`` used to SIGTERM the sandbox provider together with the worker, so a task
still running in the worker's grace period called a provider that was gone, failed and
was parked for a retry instead of finishing. The supervisor here runs a real worker and a
real sandbox provider (on a free port, so the test does not take ``reliable run``'s
fixed 8099), exactly as ``reliable run`` declares them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from config import load_settings
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import ROOT, Environment, delete_prefix, wait_until
from tests.support.lifecycle import alive
from tests.support.redis_server import free_port
from worker.cli import service_programs

# Runs the supervisor in its own process, as `reliable run` does (it installs signal
# handlers, so it must own a main thread). Programs: [name, stops_last, cold signal, argv].
DRIVER = """
import json, sys
from worker.supervisor import Program, Supervisor
programs = [Program(name, argv, cold_signal=cold, stops_last=last)
            for name, last, cold, argv in json.loads(sys.argv[1])]
raise SystemExit(Supervisor(programs, dict(__import__("os").environ), grace_seconds=30).run())
"""


@contextlib.contextmanager
def supervising(
    env: dict[str, str], programs: list[list[object]], log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], dict[int, psutil.Process]]]:
    """The driver and every process it started (seen so far); nothing survives the test."""
    seen: dict[int, psutil.Process] = {}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(programs)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, seen
    finally:
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for process in alive(list(seen.values())):
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_reliable_run_stops_the_sandbox_and_beat_only_after_the_worker() -> None:
    settings = load_settings(environment="development")
    programs = service_programs(settings, 1, with_beat=True, with_sandbox=True)
    assert [(p.name, p.stops_last) for p in programs] == [
        ("sandbox", True),
        ("worker", False),
        ("beat", True),
    ]


@pytest.mark.timeout(120)
def test_a_task_running_at_ctrl_c_finishes_against_the_sandbox_in_the_grace_period(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    environment = Environment(redis_url=redis_url, sandbox_url=f"http://127.0.0.1:{port}")
    env = environment.env(RELIABLE_WORKER__SOFT_SHUTDOWN_TIMEOUT_SECONDS="20")
    worker = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "-P",
        "prefork",
        "-c",
        "1",
        "-Q",
        environment.queue,
        "--without-mingle",
        "--without-gossip",
        "-l",
        "INFO",
    ]
    sandbox = [sys.executable, "-m", "worker.sandbox", "--port", str(port)]
    log = tmp_path / "supervisor.log"
    try:
        with supervising(
            env,
            [["sandbox", True, signal.SIGKILL, sandbox], ["worker", False, signal.SIGQUIT, worker]],
            log,
        ) as (proc, seen):

            def ready() -> bool:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
                return " ready." in log.read_text(errors="replace")

            wait_until(ready, 60, message="the worker ready")
            wait_until(
                lambda: httpx.get(f"{environment.sandbox_url}/health").is_success,
                30,
                message="the sandbox up",
            )
            sent = environment.producer().send_task(
                "test.slow_call", kwargs={"key": "at-ctrl-c", "before": 3}
            )
            wait_until(
                lambda: f"{sent.id}] received" in log.read_text(errors="replace"),
                30,
                message="the task running",
            )

            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches only the supervisor

            wait_until(lambda: proc.poll() is not None, 60, message="the supervisor to exit")
            assert proc.returncode == 0
            assert alive(list(seen.values())) == []
        text = log.read_text(errors="replace")
        outcomes = Ledger(Store(redis_url, environment.prefix)).outcomes([sent.id])
        assert outcomes == {sent.id: ["succeeded"]}, text[-3000:]
        assert "reliable run: stopping sandbox (the other processes have exited)" in text
        assert text.index("Warm shutdown") < text.index("stopping sandbox")
    finally:
        delete_prefix(redis_url, environment.prefix)
