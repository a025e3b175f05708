"""Real ``celery worker`` processes for tests, and a plain-Celery producer.

Each test environment gets its own key prefix, queue and broker key prefix, so tests
never see (or delete) anything but their own keys on a shared Redis. Waits are on
conditions with bounded timeouts, never sleeps.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import redis
from celery import Celery

from config.settings import BUSINESS_TASK_MODULES

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _alive_dir() -> Path:
    """This test run's directory of liveness files, removed when the run ends."""
    path = Path(tempfile.mkdtemp(prefix="reliable-alive-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``condition`` until truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def task_modules(*extra: str) -> str:
    """``RELIABLE_WORKER__TASK_MODULES`` for a test worker: the business tasks plus ``extra``."""
    return json.dumps([*BUSINESS_TASK_MODULES, *extra])


def delete_prefix(url: str, prefix: str) -> None:
    """Remove only this prefix's keys (never FLUSHDB: the server is shared)."""
    client = redis.Redis.from_url(url)
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)
    client.close()


# (setting, name, config) for each breaker and rate limit that tests/support/tasks.py names.
TEST_TASK_NAMES = [
    ("RELIABLE_BREAKERS", "test-breaker", {}),
    ("RELIABLE_RATE_LIMITS", "test-limit", {"kind": "gcra", "rate": 1_000_000, "burst": 1_000_000}),
]


@dataclass
class Environment:
    """One isolated test environment on the shared Redis (and optionally RabbitMQ)."""

    redis_url: str
    sandbox_url: str = "http://127.0.0.1:9"
    broker_url: str | None = None
    name: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:10])
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"{self.name}-q"

    @property
    def broker_prefix(self) -> str:
        return f"{self.name}:"

    def _alive_file(self, program: str) -> str:
        return str(_alive_dir() / f"{self.prefix.strip(':')}-{program}-alive")

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELIABLE_")}
        env.update(
            {
                "RELIABLE_ENVIRONMENT": "testing",
                "RELIABLE_REDIS__URL": self.redis_url,
                "RELIABLE_REDIS__KEY_PREFIX": self.prefix,
                "RELIABLE_BROKER__QUEUE": self.queue,
                "RELIABLE_BROKER__GLOBAL_KEYPREFIX": self.broker_prefix,
                "RELIABLE_PROVIDERS__PAYMENT_BASE_URL": self.sandbox_url,
                "RELIABLE_PROVIDERS__NOTIFICATION_BASE_URL": self.sandbox_url,
                "RELIABLE_PROVIDERS__EXPORT_BASE_URL": self.sandbox_url,
                "RELIABLE_WORKER__TASK_MODULES": task_modules("tests.support.tasks"),
                "RELIABLE_LOG__JSON_OUTPUT": "true",
                "RELIABLE_LOG__LEVEL": "INFO",
                # The business tasks' limits, opened wide: tests of limits set their own.
                "RELIABLE_RATE_LIMITS": json.dumps(
                    {
                        name: {"kind": "gcra", "rate": 1_000_000, "burst": 1_000_000}
                        for name in ("payment-gateway", "notification-per-user", "analytics-export")
                    }
                ),
                "PYTHONPATH": str(ROOT),
                # Liveness files of this environment, not the machine-wide defaults a
                # running service (or another test run) touches.
                "RELIABLE_HEALTH__WORKER_FILE": self._alive_file("worker"),
                "RELIABLE_HEALTH__BEAT_FILE": self._alive_file("beat"),
                # No fixed metrics port (reliable run's default, 9810) in tests: a test
                # that scrapes a worker gives it a free port.
                "RELIABLE_METRICS__PORT": "0",
            }
        )
        if self.broker_url:
            env["RELIABLE_BROKER__URL"] = self.broker_url
        env.update(self.extra)
        env.update(overrides)
        # A worker refuses task-declared names its settings lack: the names the test tasks
        # declare are always defined (a test's own settings for them win).
        for variable, name, default in TEST_TASK_NAMES:
            try:
                configured = json.loads(env.get(variable) or "{}")
            except ValueError:
                continue  # a test of bad settings
            if isinstance(configured, dict) and name not in configured:
                env[variable] = json.dumps({**configured, name: default})
        return env

    def producer(self) -> Celery:
        """A plain Celery client, as a producer app would configure it (no project import)."""
        broker = self.broker_url or self.redis_url
        backend = self.redis_url
        if backend.startswith("unix://"):  # kombu and Celery spell unix sockets their own way
            broker = broker.replace("unix://", "redis+socket://", 1)
            backend = backend.replace("unix://", "redis+socket://", 1)
        app = Celery(f"producer-{self.name}", broker=broker, backend=backend)
        app.conf.update(
            task_default_queue=self.queue,
            broker_transport_options={"global_keyprefix": self.broker_prefix},
            result_backend_transport_options={"global_keyprefix": self.broker_prefix},
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
        )
        return app


class WorkerProcess:
    """A ``celery -A worker.app worker`` subprocess with its log captured to a file."""

    def __init__(
        self,
        environment: Environment,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        name: str | None = None,
        log_dir: Path | None = None,
        **env: str,
    ) -> None:
        self.environment = environment
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        self.concurrency = concurrency
        self.pool = pool
        self.env = environment.env(**env)
        directory = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        self.log_path = directory / f"{environment.name}-{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = False
        self._supervisor: threading.Thread | None = None

    def supervise(self) -> WorkerProcess:
        """Restart the worker whenever it exits on its own, as a container runtime would."""

        def watch() -> None:
            while not self._stopping:
                proc = self.proc
                if proc is None:
                    return
                try:
                    proc.wait(timeout=0.2)  # wakes at once when the worker exits
                except subprocess.TimeoutExpired:
                    continue
                if not self._stopping:
                    self.restarts += 1
                    self.start(wait=False)

        self._supervisor = threading.Thread(target=watch, daemon=True)
        self._supervisor.start()
        return self

    # What the log says once the process is up.
    ready_marker = " ready."

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
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
            "INFO",
        ]

    def start(self, wait: bool = True) -> WorkerProcess:
        self._close()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log_text()[-3000:]}")
            return self.ready_marker in self.log_text()

        wait_until(ready, timeout, interval=0.1, message=f"worker {self.name} ready")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once: a whole-host crash."""
        self._stopping = True
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), escalating to SIGKILL after ``timeout``."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        if self.proc is None or self.proc.poll() is not None:
            self._close()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()

    def _close(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class BeatProcess(WorkerProcess):
    """A ``celery -A worker.app beat`` subprocess (celery-redbeat scheduler)."""

    ready_marker = "beat: Starting..."

    def command(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "-l", "INFO"]


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OpsProcess(WorkerProcess):
    """``python -m worker.ops`` (the ops HTTP service) on a free port."""

    # uvicorn logs "Application startup complete" before it binds its socket.
    ready_marker = "Uvicorn running on"

    def __init__(self, environment: Environment, **env: str) -> None:
        self.port = free_port()
        super().__init__(environment, RELIABLE_OPS__PORT=str(self.port), **env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "worker.ops"]


class FlowerProcess:
    """``celery -A worker.app flower`` on a free port, its API open (no auth: a test)."""

    def __init__(self, environment: Environment) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{environment.name}-flower.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=environment.env(FLOWER_UNAUTHENTICATED_API="true"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tasks(self) -> dict[str, Any]:
        try:
            reply = httpx.get(f"{self.url}/api/tasks", timeout=5)
        except httpx.HTTPError:
            return {}
        return reply.json() if reply.status_code == 200 else {}

    def api(self, path: str) -> Any:
        """GET one of Flower's API routes (``/api/workers``, ``/api/task/info/<id>``)."""
        reply = httpx.get(f"{self.url}{path}", timeout=30)
        assert reply.status_code == 200, (path, reply.status_code, reply.text[:500])
        return reply.json()

    def wait_ready(self) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"flower exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/api/tasks", timeout=2).status_code == 200
            return False

        wait_until(up, 60, interval=0.2, message="flower serving its API")

    def __enter__(self) -> FlowerProcess:
        """Serving its API (stopped again if it never does)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._log.close()
