"""Start and finish marks the revival tasks leave in Redis, and the bench reads back.

Both stacks' sleeping tasks call :func:`sleep_once`, so bare Celery and the reliable
stack do exactly the same work: mark the start (pid, time), sleep on the first delivery
only, mark the finish. The revived copy therefore does not sleep again, and "kill to
finish" measures the revival itself, not the task's length.

Keys live under the worker's ``RELIABLE_REDIS__KEY_PREFIX`` (deleted after the run).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

MARK_TTL_SECONDS = 600

_clients: dict[int, redis.Redis] = {}


def _client() -> redis.Redis:
    pid = os.getpid()
    if pid not in _clients:
        _clients.clear()
        _clients[pid] = redis.Redis.from_url(
            os.environ["RELIABLE_REDIS__URL"], decode_responses=True
        )
    return _clients[pid]


def marks_key(prefix: str, key: str) -> str:
    return f"{prefix}:bench:marks:{key}"


def _mark(client: redis.Redis, prefix: str, key: str, event: str) -> None:
    entry = json.dumps({"event": event, "pid": os.getpid(), "t": time.time()})
    client.rpush(marks_key(prefix, key), entry)
    client.expire(marks_key(prefix, key), MARK_TTL_SECONDS)


def sleep_once(key: str, seconds: float) -> str:
    """Mark the start, sleep ``seconds`` on the first delivery of ``key``, mark the finish."""
    client = _client()
    prefix = os.environ["RELIABLE_REDIS__KEY_PREFIX"]
    # Claim "first" before marking the start: the bench kills as soon as it sees the mark.
    first = client.set(f"{prefix}:bench:first:{key}", "1", nx=True, ex=MARK_TTL_SECONDS)
    _mark(client, prefix, key, "start")
    if first:
        time.sleep(seconds)
    _mark(client, prefix, key, "finish")
    return key


def read(client: redis.Redis, prefix: str, key: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in client.lrange(marks_key(prefix, key), 0, -1)]
