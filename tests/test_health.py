"""Health: checks with their own timeouts, the health-poll job, liveness files and readiness.

Real Redis, real ``celery worker`` and ``celery beat`` processes, a real sandbox provider;
pure logic (the checker's verdicts, readiness, settings) without processes. The exec
probe commands are the README's ("Health and Kubernetes probes"), with short thresholds.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import SettingsError, load_settings
from reliability.health import (
    Check,
    ComponentHealth,
    Degraded,
    HealthBoard,
    HealthChecker,
    Status,
    liveness,
    readiness,
)
from reliability.jobs import Jobs
from reliability.probes import BeatPulse, beat_probe, http_probe, workers_probe
from reliability.runtime import Runtime
from reliability.security import Masker
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import ROOT, BeatProcess, Environment, WorkerProcess, wait_until
from worker.health import checks
from worker.sandbox import SandboxProvider
from worker.schedule import beat_schedule

COMPONENTS = [
    "redis",
    "broker",
    "workers",
    "beat",
    "provider:payment",
    "provider:notification",
    "provider:export",
]
# The README's exec liveness probe, with a short threshold (seconds).
PROBE = "test $(( $(date +%s) - $(stat -c %Y {path}) )) -lt {seconds}"
STALE_AFTER = 3


def probe_passes(path: Path, seconds: int = STALE_AFTER) -> bool:
    command = PROBE.format(path=path, seconds=seconds)
    return subprocess.run(["sh", "-c", command], capture_output=True).returncode == 0


def files(tmp_path: Path, name: str = "w") -> dict[str, str]:
    return {
        "RELIABLE_HEALTH__WORKER_FILE": str(tmp_path / f"{name}-alive"),
        "RELIABLE_HEALTH__WORKER_FILE_TOUCH_SECONDS": "0.3",
        "RELIABLE_HEALTH__BEAT_FILE": str(tmp_path / "beat-alive"),
        "RELIABLE_HEALTH__BEAT_STALE_SECONDS": str(STALE_AFTER),
    }


def poll_by_hand(env: Environment, slot: int) -> dict[str, object]:
    result = env.producer().send_task("maintenance.health_poll", kwargs={"slot": slot})
    reply: dict[str, object] = result.get(timeout=30)
    return reply


# -- pure logic -------------------------------------------------------------------------


def test_each_check_gets_its_verdict_its_own_timeout_and_a_masked_error() -> None:
    def fails() -> str:
        raise ConnectionError("refused by redis://:hunter22@db:6379")

    def partly() -> str:
        raise Degraded("1 alive, 1 dead")

    def hangs() -> str:
        time.sleep(2)
        return "late"

    checker = HealthChecker(
        [
            Check("ok", lambda: "PONG", 1),
            Check("fails", fails, 1),
            Check("partly", partly, 1),
            Check("hangs", hangs, 0.2),
            Check("slow", lambda: time.sleep(0.05) or "slow PONG", 1),
        ],
        Masker(["hunter22"]),
        slow_ms=30,
    )
    ok, failed, partial, hung, slow = checker.run()
    assert (ok.status, ok.error, ok.detail) == (Status.HEALTHY, None, "PONG")
    assert (failed.status, failed.error) == (
        Status.UNHEALTHY,
        "ConnectionError: refused by redis://:***@db:6379",
    )
    assert (partial.status, partial.error) == (Status.DEGRADED, "1 alive, 1 dead")
    assert (hung.status, hung.error, hung.latency_ms) == (
        Status.UNHEALTHY,
        "timed out after 0.2s",
        200.0,
    )
    assert slow.status is Status.DEGRADED and slow.error.startswith("slow: ")
    assert ok.latency_ms > 0 and all(r.checked_at > 0 for r in (ok, failed, partial, hung, slow))


def result(name: str, status: Status, error: str | None = None) -> ComponentHealth:
    return ComponentHealth(name, status, 1.5, 1_800_000_000.0, error)


def test_readiness_needs_the_critical_components_and_degrades_on_the_others() -> None:
    up = [result(n, Status.HEALTHY) for n in COMPONENTS]
    body = readiness(up, ["redis", "broker"], version="1.0", environment="testing")
    assert (body["status"], body["ready"]) == ("healthy", True)
    assert body["components"]["redis"] == {
        "status": "healthy",
        "latency_ms": 1.5,
        "message": "healthy",
        "checked_at": "2027-01-15T08:00:00.000Z",
        "critical": True,
    }
    provider_down = [*up[:4], result("provider:payment", Status.UNHEALTHY, "HTTP 503"), *up[5:]]
    body = readiness(provider_down, ["redis", "broker"], version="1.0", environment="testing")
    assert (body["status"], body["ready"]) == ("degraded", True)
    assert body["components"]["provider:payment"]["message"] == "HTTP 503"
    redis_down = [result("redis", Status.UNHEALTHY, "refused"), *up[1:]]
    body = readiness(redis_down, ["redis", "broker"], version="1.0", environment="testing")
    assert (body["status"], body["ready"]) == ("unhealthy", False)
    missing = readiness(up[2:], ["redis"], version="1.0", environment="testing")
    assert missing["ready"] is False
    assert liveness(version="1.0", environment="testing") == {
        "status": "healthy",
        "version": "1.0",
        "environment": "testing",
    }


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RELIABLE_HEALTH__PAYMENT_PROBE_PATH", "health", "starting with '/'"),
        (
            "RELIABLE_HEALTH__CRITICAL",
            '["redis", "databse"]',
            "unknown health component(s) databse",
        ),
        ("RELIABLE_HEALTH__REDIS_TIMEOUT_SECONDS", "0", "greater than 0"),
    ],
)
def test_bad_health_settings_refuse_to_load_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert variable in str(caught.value) and message in str(caught.value)


def test_a_critical_provider_must_be_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELIABLE_HEALTH__CRITICAL", '["redis", "provider:export"]')
    monkeypatch.setenv("RELIABLE_HEALTH__EXPORT_PROBE_PATH", "")
    with pytest.raises(SettingsError, match="EXPORT_PROBE_PATH is empty"):
        load_settings()


def test_the_schedule_and_the_checks_come_from_settings() -> None:
    settings = load_settings(
        maintenance={"health_poll_seconds": 15}, health={"export_probe_path": ""}
    )
    assert beat_schedule(settings)["health-poll"] == {
        "task": "maintenance.health_poll",
        "schedule": 15.0,
    }
    runtime = Runtime(Store("redis://127.0.0.1:1/0", "unused"))
    built = {c.name: c.timeout for c in checks(settings, runtime)}
    assert built == {
        "redis": 2.0,
        "broker": 3.0,
        "workers": 2.0,
        "beat": 2.0,
        "provider:payment": 3.0,
        "provider:notification": 3.0,
    }


def test_the_sandbox_probe_endpoint_is_down_during_an_outage(sandbox: SandboxProvider) -> None:
    checker = HealthChecker([Check("provider:payment", http_probe(sandbox.url + "/health", 2), 2)])
    [before] = checker.run()
    sandbox.set_faults(outage=True)
    [during] = checker.run()
    assert (before.status, before.detail) == (Status.HEALTHY, "HTTP 200")
    assert (during.status, during.error) == (Status.UNHEALTHY, "HTTP 503")
    assert sandbox.effects() == []  # a probe is no effect


def test_the_board_keeps_the_contract_hash_and_a_bounded_history(bare_store: Store) -> None:
    board = HealthBoard(bare_store, history=10)
    for n in range(25):
        board.record([result("redis", Status.HEALTHY), result("beat", Status.DEGRADED, f"#{n}")])
    raw = bare_store.client.hgetall(board.key)
    assert json.loads(raw["beat"]) == {
        "status": "degraded",
        "latency_ms": 1.5,
        "checked_at": 1_800_000_000.0,
        "error": "#24",
    }
    assert bare_store.client.xlen(board.stream) == 10
    assert [r.error for r in board.history(3, component="beat")] == ["#24", "#23", "#22"]
    stale = board.latest(stale_after=60, now=1_800_000_100.0)
    assert stale["redis"].status is Status.UNHEALTHY
    assert stale["redis"].error == "stale: last checked 100s ago"


# -- real processes ---------------------------------------------------------------------


@pytest.fixture
def env(environment: Environment, tmp_path: Path) -> Iterator[Environment]:
    environment.extra.update(files(tmp_path))
    yield environment


def test_a_poll_with_everything_up_is_healthy_and_stopped_processes_go_stale(
    env: Environment, tmp_path: Path
) -> None:
    env.extra.update(
        {
            "RELIABLE_MAINTENANCE__HEALTH_POLL_SECONDS": "1",
            "RELIABLE_MAINTENANCE__BEAT_LOCK_TIMEOUT_SECONDS": "5",
        }
    )
    store = Store(env.redis_url, env.prefix)
    board, jobs = HealthBoard(store), Jobs(store)
    started = time.time()

    def all_healthy() -> dict[str, ComponentHealth] | None:
        latest = board.latest()
        ok = sorted(latest) == sorted(COMPONENTS)
        return latest if ok and all(r.status is Status.HEALTHY for r in latest.values()) else None

    with WorkerProcess(env, concurrency=1, pool="solo") as worker, BeatProcess(env) as beat:
        latest = wait_until(all_healthy, 30, message="a poll with every component healthy")
        for component in latest.values():
            assert component.error is None and 0 < component.latency_ms < 3000
            assert started <= component.checked_at <= time.time()
        assert board.history(1, component="workers")[0].detail == "1 alive"
        # The job records its run just after it stores the poll: wait for the record too.
        runs = wait_until(lambda: jobs.runs("health-poll"), 10, message="the poll's run recorded")
        assert runs and all(run.status == "ok" for run in runs)
        worker_file, beat_file = tmp_path / "w-alive", tmp_path / "beat-alive"
        assert probe_passes(worker_file) and probe_passes(beat_file)

        beat_check = HealthChecker([Check("beat", beat_probe(BeatPulse(store, 3), jobs, {}), 2)])
        beat.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: not probe_passes(beat_file), 10, 0.2, "the beat file stale")
            stale = wait_until(
                lambda: next((r for r in beat_check.run() if r.status is Status.UNHEALTHY), None),
                10,
                0.2,
                "beat unhealthy",
            )
        finally:
            beat.signal(signal.SIGCONT)
        assert stale.error == "no beat tick in the last 3s"
        wait_until(lambda: probe_passes(beat_file), 10, 0.2, "the beat file fresh again")

        worker.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: not probe_passes(worker_file), 10, 0.2, "the worker file stale")
        finally:
            worker.signal(signal.SIGCONT)
        wait_until(lambda: probe_passes(worker_file), 10, 0.2, "the worker file fresh again")


def test_a_standby_beat_keeps_its_file_fresh_while_it_waits_for_the_lock(
    env: Environment, tmp_path: Path
) -> None:
    env.extra["RELIABLE_MAINTENANCE__BEAT_LOCK_TIMEOUT_SECONDS"] = "5"
    standby_file = tmp_path / "standby-alive"
    with BeatProcess(env, name="active") as active:
        wait_until(lambda: "Acquired lock" in active.log_text(), 20, message="active beat")
        with BeatProcess(
            env, name="standby", RELIABLE_HEALTH__BEAT_FILE=str(standby_file)
        ) as standby:
            started = time.monotonic()
            # Longer than the probe's threshold: a file touched only by ticks would be stale.
            wait_until(lambda: time.monotonic() - started > STALE_AFTER + 1, 10, 0.2, "a while")
            assert probe_passes(standby_file)
            assert "Acquired lock" not in standby.log_text()
            assert probe_passes(tmp_path / "beat-alive")  # the active beat's, from its ticks


def test_a_provider_down_is_unhealthy_the_others_fine_and_the_job_ok(
    env: Environment, sandbox: SandboxProvider
) -> None:
    payments = SandboxProvider().start()
    env.extra["RELIABLE_PROVIDERS__PAYMENT_BASE_URL"] = payments.url
    store = Store(env.redis_url, env.prefix)
    board = HealthBoard(store)
    try:
        with WorkerProcess(env, concurrency=1, pool="solo"):
            first = poll_by_hand(env, 1)
            before = board.latest()
            payments.stop()
            second = poll_by_hand(env, 2)
            after = board.latest()
    finally:
        payments.stop()
    assert before["provider:payment"].status is Status.HEALTHY
    assert after["provider:payment"].status is Status.UNHEALTHY
    assert "Connect" in (after["provider:payment"].error or "")
    fine = ["redis", "broker", "workers", "provider:notification", "provider:export"]
    assert {n: after[n].status for n in fine} == {n: Status.HEALTHY for n in fine}
    # No beat runs in this test: its component says so.
    assert (after["beat"].status, after["beat"].error) == (
        Status.UNHEALTHY,
        f"no beat tick in the last {STALE_AFTER}s",
    )
    assert first == {
        "ran": True,
        "slot": 1,
        "status": "ok",
        "health": "degraded",
        "ready": True,
        "unhealthy": ["beat"],
        "degraded": [],
    }
    assert second == {**first, "slot": 2, "unhealthy": ["beat", "provider:payment"]}
    assert [(r.slot, r.status) for r in Jobs(store).runs("health-poll")] == [(2, "ok"), (1, "ok")]
    assert len(board.history(10, component="provider:payment")) == 2


def test_a_killed_worker_leaves_the_workers_component_and_its_file_goes_stale(
    env: Environment, tmp_path: Path
) -> None:
    beats = {
        "RELIABLE_WORKER__HEARTBEAT_INTERVAL_SECONDS": "0.5",
        "RELIABLE_WORKER__HEARTBEAT_TTL_SECONDS": "1.5",
    }
    env.extra.update(beats)
    store = Store(env.redis_url, env.prefix)
    workers = HealthChecker([Check("workers", workers_probe(store), 2)])
    a = WorkerProcess(env, concurrency=1, pool="solo", name="wa", **files(tmp_path, "a"))
    b = WorkerProcess(env, concurrency=1, pool="solo", name="wb", **files(tmp_path, "b"))
    with a, b:
        wait_until(lambda: workers.run()[0].detail == "2 alive", 10, message="2 workers alive")
        ping = subprocess.run(
            [
                *(sys.executable, "-m", "celery", "-A", "worker.app", "inspect", "ping"),
                *("-d", f"wa@{socket.gethostname()}", "--timeout", "5"),
            ],
            cwd=ROOT,
            env=env.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
        b.kill()
        # Dead after its heartbeat TTL, then revived and forgotten by the survivor.
        wait_until(lambda: workers.run()[0].detail == "1 alive", 15, 0.1, "1 worker alive")
        assert workers.run()[0].status is Status.HEALTHY
        wait_until(lambda: not probe_passes(tmp_path / "b-alive"), 10, 0.2, "b's file stale")
        assert probe_passes(tmp_path / "a-alive")
        poll_by_hand(env, 7)
        assert HealthBoard(store).history(1, component="workers")[0].detail == "1 alive"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, "health", *args)


def test_not_ready_when_redis_is_unreachable(environment: Environment) -> None:
    up = health_cli(environment.env())
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.startswith("status=degraded ready=yes (critical: redis, broker)\n")
    assert "workers                unhealthy" in up.stdout
    closed = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    down = health_cli(environment.env(RELIABLE_REDIS__URL=closed), "--json")
    assert down.returncode == 1, down.stdout + down.stderr
    body = json.loads(down.stdout)
    assert (body["status"], body["ready"]) == ("unhealthy", False)
    for name in ("redis", "broker"):
        assert body["components"][name]["status"] == "unhealthy"
        assert "Connection refused" in body["components"][name]["message"]
    assert "s3cret-pw" not in down.stdout + down.stderr


def test_a_stored_result_that_does_not_parse_reads_unhealthy(bare_store: Store) -> None:
    """Written by hand or damaged: the board still answers, the component unhealthy."""
    board = HealthBoard(bare_store)
    bare_store.call(
        "test", lambda c: c.hset(board.key, mapping={"redis": "not json", "beat": "[]"})
    )
    latest = board.latest()
    assert {n: (r.status, r.checked_at) for n, r in latest.items()} == {
        "beat": (Status.UNHEALTHY, 0.0),
        "redis": (Status.UNHEALTHY, 0.0),
    }
    assert latest["redis"].error == "unreadable stored result (JSONDecodeError)"
    assert latest["beat"].error == "unreadable stored result (TypeError)"
