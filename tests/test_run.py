"""``reliable run`` supervises what it starts, and nothing it started outlives it.

Each test runs ``reliable run`` as a terminal does (its own process group; Ctrl-C is
SIGINT to that group) and records every process it ever saw, then checks with ``ps``
(psutil) that none is left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis

from tests.support.fleet import ROOT, Environment, task_modules, wait_until
from tests.support.lifecycle import ReliableRun, alive, no_url_env, servers_on
from worker import embedded

# Loaded by the workers of the tests below through RELIABLE_WORKER__TASK_MODULES.
if os.environ.get("RUN_TEST_TASKS") == "crash" and "worker" in sys.argv:
    raise RuntimeError("this worker crashes at start-up (test)")
if os.environ.get("RUN_TEST_TASKS") == "misconfigured":
    from reliability import ReliableTask
    from worker.app import app

    @app.task(base=ReliableTask, name="run_test.charge", breaker="paymnt")
    def charge() -> None:
        """Names a breaker the settings do not define."""


TASK_MODULES = task_modules("tests.support.tasks", "tests.test_run")


def message_kept(environment: Environment, task_id: str) -> str | None:
    """Where the broker holds the message: its queue, a processing list or unacked."""
    client = redis.Redis.from_url(environment.redis_url)
    queue = f"{environment.broker_prefix}{environment.queue}"
    places = {
        queue: client.lrange(queue, 0, -1),
        "unacked": client.hvals(f"{environment.broker_prefix}unacked"),
    }
    for key in client.scan_iter(match=f"{queue}:processing:*"):
        if client.type(key) == b"list":
            places[key.decode()] = client.lrange(key, 0, -1)
    for place, messages in places.items():
        if any(task_id.encode() in message for message in messages):
            return place
    return None


def test_ctrl_c_stops_the_worker_beat_and_the_embedded_redis_it_started(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ReliableRun(
        no_url_env(data_dir), tmp_path / "run.log", "-c", "1", data_dir=data_dir
    ) as run:
        run.wait_log(" ready.")
        run.wait_log("beat: Starting")
        run.wait_log("ops_service_starting")
        worker, beat = run.child("worker"), run.child("beat")
        assert len(worker.children()) == 1 and len(servers_on(data_dir)) == 1
        # Children run in their own process groups: the terminal's Ctrl-C reaches only
        # `reliable run`, which forwards a warm shutdown deliberately.
        assert {os.getpgid(worker.pid), os.getpgid(beat.pid)} == {worker.pid, beat.pid}
        started = run.look()
        run.ctrl_c()
        assert run.wait_exit(60) == 0
    log = run.log()
    assert "reliable run: warm shutdown on request" in log
    assert "reliable run: embedded redis stopped" in log
    assert "restarting" not in log
    assert len(started) == 5  # worker, its pool child, beat, the ops service, redis-server
    assert alive(list(run.seen.values())) == []
    assert not embedded.is_running(data_dir)


def test_a_worker_that_dies_is_restarted_and_consumes_again(
    environment: Environment, tmp_path: Path
) -> None:
    producer = environment.producer()
    env = environment.env(RELIABLE_REDIS__DATA_DIR=str(tmp_path / "data"))
    with ReliableRun(env, tmp_path / "run.log", "--no-beat", "-c", "1") as run:
        run.wait_log(" ready.")
        worker = run.child("worker")
        pool = worker.children()
        worker.kill()  # SIGKILL of the main process alone: its pool child is orphaned
        run.wait_log(" ready.", count=2)
        assert producer.send_task("test.echo", args=["again"]).get(timeout=30) == "again"
        assert alive([worker, *pool]) == []  # the dead worker's pool child went with it
        run.ctrl_c()
        assert run.wait_exit(60) == 0
    assert re.search(
        rf"reliable run: worker \(pid {worker.pid}\) was killed by SIGKILL; "
        r"restarting in 0\.5 s \(1 of 5 deaths allowed in 60 s\)",
        run.log(),
    )
    assert alive(list(run.seen.values())) == []


def test_a_worker_that_keeps_dying_stops_everything_and_exits_non_zero(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = no_url_env(data_dir, RUN_TEST_TASKS="crash", RELIABLE_WORKER__TASK_MODULES=TASK_MODULES)
    with ReliableRun(
        env, tmp_path / "run.log", "-c", "1", "--max-deaths", "3", data_dir=data_dir
    ) as run:
        code = run.wait_exit(90)
    log = run.log()
    assert code == 1, log[-3000:]
    restarts = re.findall(
        r"reliable run: worker \(pid \d+\) exited with status 1; "
        r"restarting in (\S+) s",
        log,
    )
    assert restarts == ["0.5", "1.0"], log[-3000:]  # backoff doubles
    assert re.search(
        r"worker \(pid \d+\) exited with status 1; it died 3 times in 60 s: "
        r"giving up, stopping everything",
        log,
    )
    assert "beat: Starting" in log  # beat was up, and was stopped with the rest
    assert "reliable run: embedded redis stopped" in log
    assert alive(list(run.seen.values())) == []
    assert not embedded.is_running(data_dir)


def test_a_second_ctrl_c_is_a_cold_shutdown_and_the_running_message_stays_in_the_broker(
    environment: Environment, tmp_path: Path
) -> None:
    env = environment.env(
        RELIABLE_WORKER__SOFT_SHUTDOWN_TIMEOUT_SECONDS="3",
        RELIABLE_REDIS__DATA_DIR=str(tmp_path / "data"),
    )
    with ReliableRun(env, tmp_path / "run.log", "--no-beat", "-c", "1") as run:
        run.wait_log(" ready.")
        sent = environment.producer().send_task("test.sleep", args=["cold", 300])
        run.wait_log(f"{sent.id}] received")
        run.ctrl_c()
        run.wait_log("Warm shutdown")
        assert run.proc is not None and run.proc.poll() is None  # waiting for the task
        run.ctrl_c()
        assert run.wait_exit(60) == 0
    log = run.log()
    assert "reliable run: cold shutdown on request" in log
    assert "still running after" not in log  # the second Ctrl-C, not the grace, ended it
    assert alive(list(run.seen.values())) == []
    wait_until(
        lambda: message_kept(environment, sent.id),
        10,
        message="the interrupted message back in the broker",
    )


def test_a_worker_that_refuses_its_configuration_stops_reliable_run_at_once(
    environment: Environment, tmp_path: Path
) -> None:
    env = environment.env(
        RUN_TEST_TASKS="misconfigured",
        RELIABLE_WORKER__TASK_MODULES=TASK_MODULES,
        RELIABLE_REDIS__DATA_DIR=str(tmp_path / "data"),
    )
    with ReliableRun(env, tmp_path / "run.log", "-c", "1") as run:
        code = run.wait_exit(60)
    log = run.log()
    assert code == 78, log[-3000:]
    assert [line for line in log.splitlines() if "configuration error" in line] == [
        "configuration error: task run_test.charge names breaker 'paymnt', which "
        "RELIABLE_BREAKERS does not define (known: analytics, database, notification, "
        "payment, test-breaker)"
    ]
    assert re.search(
        r"reliable run: worker \(pid \d+\) refused its configuration; "
        r"stopping everything",
        log,
    )
    assert "restarting" not in log
    assert alive(list(run.seen.values())) == []


def test_ctrl_c_is_warm_when_the_pipe_it_logs_to_died_with_it(tmp_path: Path) -> None:
    """`reliable run 2>&1 | tee log` and Ctrl-C: the terminal's SIGINT ends `tee` too, so
    every line written after it meets a closed pipe. The shutdown stays warm (exit 0, the
    embedded Redis stopped, nothing killed) instead of a crash that SIGKILLs the children."""
    data_dir = tmp_path / "data"
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", "-c", "1"],
        cwd=ROOT,
        env=no_url_env(data_dir),
        stdout=write_end,
        stderr=write_end,
        start_new_session=True,
    )
    os.close(write_end)
    seen: list[psutil.Process] = []
    tee = os.fdopen(read_end, "rb", buffering=0)
    try:
        copied = b""
        deadline = time.monotonic() + 90
        while not (b" ready." in copied and b"ops_service_starting" in copied):
            assert time.monotonic() < deadline, copied[-3000:].decode(errors="replace")
            chunk = tee.read(65536)
            assert chunk, copied[-3000:].decode(errors="replace")
            copied += chunk
        seen = psutil.Process(proc.pid).children(recursive=True) + servers_on(data_dir)
        tee.close()  # tee is gone: every later write to the pipe fails
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        assert alive(seen) == [] and not embedded.is_running(data_dir)
        assert len(seen) == 5  # worker, its pool child, beat, the ops service, redis-server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for process in alive(seen):
            process.kill()
        embedded.stop_embedded_redis(data_dir)
