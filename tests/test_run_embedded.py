"""The embedded Redis belongs to the process that runs the service, never to an import.

Importing ``worker.app`` computes the embedded server's URL and starts nothing. A
standalone ``celery worker`` or ``beat`` with no Redis URL starts the server when it
starts (if none runs) and stops it when it exits — only if it started it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.fleet import ROOT, free_port, wait_until
from tests.support.lifecycle import alive, no_url_env, servers_on
from worker import embedded


def test_importing_the_app_with_no_redis_url_starts_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-c", "import worker.app as s; print(s.runtime.store.url)"],
        cwd=ROOT,
        env=no_url_env(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == embedded.embedded_url(data_dir)
    assert not data_dir.exists() and servers_on(data_dir) == []


def celery(program: str, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "celery", "-A", "worker.app"]
    command += ["worker", "-P", "solo", "--without-mingle", "--without-gossip"]
    if program == "beat":
        command[-5:] = ["beat", "-s", str(data_dir.parent / "schedule")]
    env = no_url_env(data_dir)
    if program == "ops":
        command = [sys.executable, "-m", "worker.ops"]
        env["RELIABLE_OPS__PORT"] = str(free_port())
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_until_started(
    program: str, data_dir: Path, log: Path, banner: str, sig: int = signal.SIGTERM
) -> list[psutil.Process]:
    """Start the program, wait for ``banner`` in its log, signal it; returns the
    redis-servers that ran on the data directory meanwhile."""
    proc = celery(program, data_dir, log)
    try:
        # Beat logs its banner just before its init signal: wait for the server too.
        wait_until(
            lambda: banner in log.read_text(errors="replace") and servers_on(data_dir),
            60,
            interval=0.1,
            message=f"{program} started, with a redis-server",
        )
        servers = servers_on(data_dir)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return servers


def test_a_standalone_worker_starts_the_embedded_redis_and_stops_it_at_exit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    try:
        servers = run_until_started("worker", data_dir, tmp_path / "w.log", " ready.")
        assert len(servers) == 1
        assert alive(servers) == [] and not embedded.is_running(data_dir)
    finally:
        embedded.stop_embedded_redis(data_dir)


def test_a_standalone_beat_starts_the_embedded_redis_and_stops_it_at_exit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    try:
        servers = run_until_started("beat", data_dir, tmp_path / "b.log", "beat: Starting")
        assert len(servers) == 1
        assert alive(servers) == [] and not embedded.is_running(data_dir)
    finally:
        embedded.stop_embedded_redis(data_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_ops_service_starts_the_embedded_redis_and_stops_it_at_exit(
    tmp_path: Path, sig: int
) -> None:
    """uvicorn re-raises the signal it caught after its own shutdown: the server still stops."""
    data_dir = tmp_path / "data"
    try:
        servers = run_until_started("ops", data_dir, tmp_path / "o.log", "Application startup", sig)
        assert len(servers) == 1
        assert alive(servers) == [] and not embedded.is_running(data_dir)
    finally:
        embedded.stop_embedded_redis(data_dir)


def test_a_worker_leaves_running_an_embedded_redis_it_did_not_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert embedded.start_embedded_redis(data_dir)
    try:
        servers = run_until_started("worker", data_dir, tmp_path / "w.log", " ready.")
        assert len(servers) == 1 and alive(servers) == servers
        assert embedded.is_running(data_dir)
    finally:
        embedded.stop_embedded_redis(data_dir)
