"""Prometheus metrics from real processes: a prefork worker (``-c 2``) under load and
the ops service, scraped over HTTP and checked with ``promtool check metrics``.

After a scripted run (300 keyed sandbox calls, 40 re-sent keys, 20 flaky tasks retried
once) every ``reliable_task_outcomes_total`` sample equals the outcome ledger's count
for that task and outcome, and the succeeded calls equal the sandbox's effects. A pool
child killed by SIGKILL leaves no live gauge behind and takes no count with it.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import load_settings
from reliability.breaker import BreakerMode, CircuitBreaker
from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import ROOT, Environment, OpsProcess, WorkerProcess, free_port, wait_until
from tests.support.needs import missing
from worker.cli import RUN_METRICS_PORT, service_programs
from worker.sandbox import SandboxProvider

PROMTOOL = shutil.which("promtool")
CALLS = 300
RESENT = 40
FLAKY = 20


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on a scrape; fails (never skips) without promtool in CI."""
    if PROMTOOL is None:
        missing("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name`` by its sorted label pairs."""
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(text: str, family: str, **labels: str) -> float:
    return sum(
        value
        for key, value in samples(text, family).items()
        if all((k, v) in key for k, v in labels.items())
    )


# The module's environment and sandbox are conftest's shared ones (own prefix, cleaned).
@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxProvider) -> SandboxProvider:
    return shared_sandbox


@pytest.fixture(scope="module")
def environment(shared_env: Environment) -> Environment:
    return shared_env


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multiproc")


@pytest.fixture(scope="module")
def worker(environment: Environment, base: Path) -> Iterator[WorkerProcess]:
    port = free_port()
    with WorkerProcess(
        environment,
        concurrency=2,
        RELIABLE_METRICS__PORT=str(port),
        RELIABLE_METRICS__MULTIPROC_DIR=str(base),
    ) as process:
        process.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
        yield process


def scrape(url: str) -> str:
    reply = httpx.get(url, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return reply.text


def test_worker_metrics_equal_the_ledger_and_pass_promtool(
    environment: Environment, sandbox: SandboxProvider, worker: WorkerProcess
) -> None:
    producer = environment.producer()
    keys = [f"k-{uuid.uuid4().hex[:8]}-{i}" for i in range(CALLS)]
    sent = [producer.send_task("test.call", args=[key]).id for key in keys]
    ledger = Ledger(Store(environment.redis_url, environment.prefix))

    def settled(ids: list[str]) -> bool:
        return ledger.reconcile(ids).lost == 0

    wait_until(lambda: settled(sent), 120, message="the calls settled")
    # Keys already completed: served from the idempotency store, not run again.
    resent = [producer.send_task("test.call", args=[key]).id for key in keys[:RESENT]]
    flaky = [
        producer.send_task("test.flaky", args=[f"f-{uuid.uuid4().hex[:8]}", 1]).id
        for _ in range(FLAKY)
    ]
    wait_until(lambda: settled(resent + flaky), 120, message="re-sent and flaky tasks settled")

    text = scrape(worker.metrics_url)  # type: ignore[attr-defined]
    checked = promtool_check(text)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")

    ledger_counts = collections.Counter(
        (entry["task"], entry["outcome"]) for entry in ledger.entries()
    )
    counted = {
        (dict(key)["name"], dict(key)["outcome"]): value
        for key, value in samples(text, "reliable_task_outcomes_total").items()
    }
    assert counted == {key: float(n) for key, n in ledger_counts.items()}
    assert counted[("test.call", "succeeded")] == CALLS == len(sandbox.effects("webhooks"))
    assert counted[("test.call", "skipped")] == RESENT
    assert counted[("test.flaky", "retried")] == FLAKY
    assert counted[("test.flaky", "succeeded")] == FLAKY
    assert total(text, "reliable_tasks_deduplicated_total", reason="completed_key") == RESENT
    assert total(text, "reliable_task_retries_total", name="test.flaky") == FLAKY
    assert total(text, "reliable_tasks_running") == 0
    assert total(text, "reliable_store_round_trip_seconds_count", operation="admission") >= (
        CALLS + RESENT + 2 * FLAKY
    )
    # Label names compatible with celery-exporter; no family under another prefix.
    names = {f.name for f in text_string_to_metric_families(text)}
    assert all(name.startswith("reliable_") for name in names), names
    assert all("task" not in dict(key) for key in samples(text, "reliable_task_outcomes_total"))


def test_multiproc_dir_is_this_workers_own_and_holds_only_its_processes(
    worker: WorkerProcess, base: Path
) -> None:
    own = base / str(worker.pid)
    names = sorted(p.name for p in own.iterdir())
    assert f"counter_{worker.pid}.db" in names
    children = {child.pid for child in worker.children()}
    assert {f"counter_{pid}.db" for pid in children} <= set(names)
    assert all(re.fullmatch(r"(counter|histogram|gauge_livesum)_\d+\.db", n) for n in names)
    assert [p.name for p in base.iterdir() if p.name.isdigit()] == [str(worker.pid)]


def test_prepare_wipes_its_own_directory_and_those_of_dead_processes(tmp_path: Path) -> None:
    """What an entry point does first: a restarted worker never sums an old run's counts."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (4_000_000, dead.pid, os.getpid()):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / f"counter_{pid}.db").write_bytes(b"old counts")
    (tmp_path / "notes").mkdir()
    # In a process of its own, as an entry point runs it (it sets process-wide state).
    run = subprocess.run(
        [sys.executable, "-c", "from worker import multiproc; print(multiproc.prepare(4000000))"],
        cwd=ROOT,
        env={**os.environ, "RELIABLE_METRICS__MULTIPROC_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.stdout.split() == [str(tmp_path / "4000000")], run.stderr
    assert list((tmp_path / "4000000").iterdir()) == []  # wiped
    assert not (tmp_path / str(dead.pid)).exists()  # a dead process's directory: removed
    assert (tmp_path / str(os.getpid()) / f"counter_{os.getpid()}.db").exists()  # alive: kept
    assert (tmp_path / "notes").is_dir()  # not ours: left alone


def test_a_sigkilled_pool_child_leaves_no_live_gauge_and_keeps_its_counts(
    environment: Environment, worker: WorkerProcess, base: Path
) -> None:
    url = worker.metrics_url  # type: ignore[attr-defined]
    before = total(scrape(url), "reliable_task_outcomes_total", outcome="succeeded")
    producer = environment.producer()
    keys = [f"s-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    sent = [producer.send_task("test.sleep", args=[key, 3.0]).id for key in keys]
    wait_until(
        lambda: total(scrape(url), "reliable_tasks_running", name="test.sleep") == 2,
        30,
        message="both children running test.sleep",
    )
    own = base / str(worker.pid)
    victim = worker.children()[0].pid
    assert (own / f"gauge_livesum_{victim}.db").exists()
    counters = sorted(p.name for p in own.glob(f"counter_{victim}.db"))
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: total(scrape(url), "reliable_tasks_running", name="test.sleep") <= 1,
        30,
        message="the killed child's running task no longer counted",
    )
    assert not (own / f"gauge_livesum_{victim}.db").exists()
    # Its counters stay: their counts are part of the totals.
    assert sorted(p.name for p in own.glob(f"counter_{victim}.db")) == counters
    ledger = Ledger(Store(environment.redis_url, environment.prefix))
    wait_until(lambda: ledger.reconcile(sent).lost == 0, 60, message="sleeps settled")
    after = scrape(url)
    assert total(after, "reliable_task_outcomes_total", outcome="succeeded") == before + 2
    assert total(after, "reliable_tasks_running") == 0
    checked = promtool_check(after)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


def test_a_port_in_use_is_one_log_line_and_the_worker_runs_on(
    environment: Environment, base: Path
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with WorkerProcess(
            environment,
            concurrency=1,
            RELIABLE_METRICS__PORT=str(port),
            RELIABLE_METRICS__MULTIPROC_DIR=str(base),
        ) as process:
            result = environment.producer().send_task("test.echo", args=["up"])
            assert result.get(timeout=30) == "up"
            assert process.log_text().count("metrics_port_unavailable") == 1
            assert "Traceback" not in process.log_text()


def test_ops_metrics_hold_the_fleet_state_once_and_pass_promtool(
    environment: Environment, worker: WorkerProcess
) -> None:
    store = Store(environment.redis_url, environment.prefix)
    # One dead letter (a permanent failure: no retry), one breaker forced open.
    failed = environment.producer().send_task("test.flaky", args=["never", "not a number"])
    ledger = Ledger(store)
    wait_until(lambda: ledger.reconcile([failed.id]).lost == 0, 30, message="dead-lettered")
    CircuitBreaker("test-breaker", store).set_mode(BreakerMode.FORCED_OPEN)
    with OpsProcess(environment) as ops:
        text = scrape(f"{ops.url}/metrics")
    checked = promtool_check(text)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")

    assert total(text, "reliable_fleet_store_up") == 1
    by_class = collections.Counter(e.failure_class for e in DeadLetterQueue(store).iter())
    assert sum(by_class.values()) == 1
    assert {dict(k)["failure_class"]: v for k, v in samples(text, "reliable_dlq_size").items()} == {
        c: float(n) for c, n in by_class.items()
    }
    assert total(text, "reliable_degradation_level") == 0
    assert samples(text, "reliable_parked_messages") == {(): 0.0}
    assert samples(text, "reliable_leases_held") == {(): 0.0}
    # Every configured breaker once: the forced one open, the others closed.
    states = {
        dict(k)["breaker"]: v for k, v in samples(text, "reliable_circuit_breaker_state").items()
    }
    assert states["test-breaker"] == 2
    assert set(v for name, v in states.items() if name != "test-breaker") == {0.0}
    assert samples(text, "reliable_rate_limit_available_tokens")
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("reliable_"), family.name


def test_prometheus_client_is_imported_after_the_multiproc_dir_is_set(tmp_path: Path) -> None:
    """``python -X importtime``: worker.multiproc runs before prometheus_client loads."""
    env = {**os.environ, "RELIABLE_METRICS__MULTIPROC_DIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    probe = (
        "import os, sys; import worker.app; "
        "from prometheus_client import values; "
        "print(os.environ['PROMETHEUS_MULTIPROC_DIR']); "
        "print(values.ValueClass.__name__)"
    )
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    order = [
        line.rsplit("|", 1)[1].strip()
        for line in run.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert order.index("worker.multiproc") < order.index("prometheus_client")
    directory, value_class = run.stdout.split()
    assert Path(directory).parent == tmp_path
    assert value_class == "MmapedValue"


def test_reliable_runs_worker_serves_metrics_unless_told_otherwise() -> None:
    """`reliable run` runs one worker on this host: its /metrics is on (9810) unless
    RELIABLE_METRICS__PORT says otherwise (0 = off); beat and ops are not told."""

    def envs(**metrics: Any) -> dict[str, dict[str, str]]:
        settings = load_settings(environment="development", metrics=metrics)
        programs = service_programs(settings, 1, with_beat=True, with_sandbox=False, with_ops=True)
        return {p.name: p.env for p in programs}

    assert RUN_METRICS_PORT == 9810
    assert envs() == {"worker": {"RELIABLE_METRICS__PORT": "9810"}, "beat": {}, "ops": {}}
    assert envs(port=0) == {"worker": {}, "beat": {}, "ops": {}}
    assert envs(port=9999) == {"worker": {}, "beat": {}, "ops": {}}  # its own setting applies


def test_an_unusable_multiproc_dir_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    """A broken setting, as every other: one line naming it, exit 78 (no traceback)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "RELIABLE_METRICS__MULTIPROC_DIR": str(blocker / "metrics")}
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "limits", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr.splitlines() == [
        "invalid configuration:",
        f"  RELIABLE_METRICS__MULTIPROC_DIR: cannot use '{blocker / 'metrics'}' (Not a directory)",
    ]
