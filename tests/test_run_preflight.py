"""A worker whose tasks name a breaker or rate limit the settings lack refuses to start.

Before it consumes, the worker's main process resolves every name its reliable tasks
declare; a missing one is one line on stderr and exit status 78 — instead of a worker
that starts and dead-letters every message of that task as ``poison``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from reliability import ReliableTask
from reliability.ratelimit import RateLimit
from reliability.runtime import Runtime
from reliability.store import Store
from tests.support.fleet import ROOT, Environment, task_modules
from worker.preflight import EX_CONFIG, missing_task_modules, unresolved_names

# Loaded by the workers below through RELIABLE_WORKER__TASK_MODULES.
if os.environ.get("PREFLIGHT_TASKS") == "breaker":
    from worker.app import app

    @app.task(base=ReliableTask, name="payments.charge_typo", breaker="paymnt")
    def charge_typo() -> None:
        """Names a breaker the settings do not define."""


if os.environ.get("PREFLIGHT_TASKS") == "limit":
    from worker.app import app

    @app.task(base=ReliableTask, name="exports.typo", rate_limits=("analytics-exprt",))
    def export_typo() -> None:
        """Names a rate limit the settings do not define."""


def start_worker(environment: Environment, tasks: str) -> subprocess.CompletedProcess[str]:
    env = environment.env(
        PREFLIGHT_TASKS=tasks,
        PYTHONWARNINGS="ignore",  # no root warning
        RELIABLE_WORKER__TASK_MODULES=task_modules(__name__),
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "-P",
            "solo",
            "-Q",
            environment.queue,
            "-l",
            "INFO",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_worker_whose_task_names_an_undefined_breaker_exits_with_one_line(redis_url: str) -> None:
    done = start_worker(Environment(redis_url=redis_url), "breaker")
    assert done.returncode == EX_CONFIG, done.stderr
    assert done.stdout == ""  # stopped before the banner: nothing consumed
    assert done.stderr.splitlines() == [
        "configuration error: task payments.charge_typo names breaker 'paymnt', which "
        "RELIABLE_BREAKERS does not define (known: analytics, database, notification, "
        "payment, test-breaker)"
    ]


def test_a_worker_whose_task_names_an_undefined_rate_limit_exits_with_one_line(
    redis_url: str,
) -> None:
    done = start_worker(Environment(redis_url=redis_url), "limit")
    assert done.returncode == EX_CONFIG, done.stderr
    assert done.stderr.splitlines() == [
        "configuration error: task exports.typo names rate limit 'analytics-exprt', which "
        "RELIABLE_RATE_LIMITS does not define (known: analytics-export, "
        "notification-per-user, payment-gateway, test-limit)"
    ]


@pytest.mark.parametrize("program", ["worker", "beat"])
def test_a_task_module_that_does_not_exist_stops_worker_and_beat_with_one_line(
    redis_url: str, tmp_path: Path, program: str
) -> None:
    env = Environment(redis_url=redis_url).env(
        PYTHONWARNINGS="ignore",
        RELIABLE_WORKER__TASK_MODULES='["tasks.payments", "nonexistent.module"]',
    )
    extra = ["-s", str(tmp_path / "schedule")] if program == "beat" else ["-P", "solo"]
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", program, *extra, "-l", "INFO"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EX_CONFIG, done.stderr
    assert done.stderr.splitlines() == [
        "configuration error: RELIABLE_WORKER__TASK_MODULES names module "
        "'nonexistent.module', which cannot be imported (No module named 'nonexistent')"
    ]


def test_missing_task_modules_names_each_one_and_passes_existing_ones() -> None:
    assert missing_task_modules(["tasks.payments", "worker.beat"]) == []
    assert missing_task_modules(["tasks.nope", "tasks.payments.sub"]) == [
        "RELIABLE_WORKER__TASK_MODULES names module 'tasks.nope', which cannot be imported "
        "(No module named 'tasks.nope')",
        "RELIABLE_WORKER__TASK_MODULES names module 'tasks.payments.sub', which cannot be "
        "imported (__path__ attribute not found on 'tasks.payments' while trying to find "
        "'tasks.payments.sub')",
    ]


def test_every_unresolved_name_is_reported_and_defined_ones_and_limit_objects_pass() -> None:
    app = Celery("preflight-unit", set_as_current=False)

    @app.task(
        base=ReliableTask,
        name="b.task",
        shared=False,
        breaker="nope",
        rate_limits=("payment-gateway", "missing", RateLimit(name="inline")),
    )
    def both() -> None: ...

    @app.task(
        base=ReliableTask,
        name="a.task",
        shared=False,
        breaker="payment",
        rate_limits=("payment-gateway",),
    )
    def fine() -> None: ...

    @app.task(name="plain.task", shared=False)
    def plain() -> None: ...

    runtime = Runtime(Store("redis://127.0.0.1:1/0"))  # never contacted
    # Tasks other modules registered as shared (the test tasks) join every app's registry.
    ours = [
        line
        for line in unresolved_names(app.tasks, runtime)
        if line.startswith(("task a.", "task b.", "task plain."))
    ]
    assert ours == [
        "task b.task names breaker 'nope', which RELIABLE_BREAKERS does not define "
        "(known: analytics, database, notification, payment)",
        "task b.task names rate limit 'missing', which RELIABLE_RATE_LIMITS does not define "
        "(known: analytics-export, notification-per-user, payment-gateway)",
    ]
