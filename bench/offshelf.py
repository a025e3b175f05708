"""The off-the-shelf stack the issue compares against, wired as each library's docs suggest.

- **celery-once** (``QueueOnce``): the producer takes a Redis lock per task when it
  queues it (``apply_async``: ``SET NX PX``), the worker deletes it after the task ran
  (``after_return``). Keyed by the task's arguments, like ``idempotent=True``.
- **pybreaker** with ``CircuitRedisStorage``: the breaker's state and counters live in
  Redis, shared by every process (``breaker.call(fn)``).
- **limits**: a ``MovingWindowRateLimiter`` on ``RedisStorage`` (one Lua call per hit),
  at a rate that never refuses, like the reliable stack's bench limit.
- **tenacity**: ``@retry`` around the call (in-process retries; no Redis).

Nothing here has import-time effects: the worker app is :mod:`bench.offshelf_app`, and
the bench process uses :func:`register_producer_task` to queue through ``QueueOnce``.
Per-process clients are created lazily (after a prefork fork), as the libraries need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task

NAME = "bench.offshelf_noop"
# celery-once's lock covers the task's own argument and the run, so runs never collide
# (celery-once keys take no prefix: qo_<task>_batch-<run>_i-<i>).
ONCE_KEYS = ["batch", "i"]
ONCE_TIMEOUT_SECONDS = 60 * 60  # celery-once's default
FAIL_MAX = 5
RESET_TIMEOUT_SECONDS = 30
LIMIT = "1000000/second"
RETRY_ATTEMPTS = 5


class TransientError(Exception):
    """What tenacity retries (never raised by the no-op)."""


def once_config(redis_url: str) -> dict[str, Any]:
    """``app.conf.ONCE`` (celery-once's Redis backend)."""
    return {
        "backend": "celery_once.backends.Redis",
        "settings": {"url": redis_url, "default_timeout": ONCE_TIMEOUT_SECONDS},
    }


def lock_prefix(batch: str) -> str:
    """Where celery-once's lock keys of one run start (for clean-up after a failed run)."""
    return f"qo_{NAME}_batch-{batch}_"


@dataclass
class Guards:
    """One process's breaker and limiter."""

    breaker: Any
    limiter: Any
    item: Any

    @classmethod
    def build(cls, redis_url: str, prefix: str) -> Guards:
        import limits
        import pybreaker

        # pybreaker's docs: a plain StrictRedis client, without decode_responses.
        storage = pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, redis.Redis.from_url(redis_url), namespace=f"{prefix}:offshelf"
        )
        breaker = pybreaker.CircuitBreaker(
            fail_max=FAIL_MAX,
            reset_timeout=RESET_TIMEOUT_SECONDS,
            state_storage=storage,
            name="bench-offshelf",
        )
        limit_storage = limits.storage.storage_from_string(redis_url, key_prefix=f"{prefix}:limits")
        return cls(
            breaker, limits.strategies.MovingWindowRateLimiter(limit_storage), limits.parse(LIMIT)
        )


_guards: dict[int, Guards] = {}


def guards(redis_url: str, prefix: str) -> Guards:
    """This process's guards, created on first use (a pool child builds its own)."""
    pid = os.getpid()
    found = _guards.get(pid)
    if found is None:
        _guards.clear()
        found = _guards[pid] = Guards.build(redis_url, prefix)
    return found


def _retrying() -> Any:
    import tenacity

    return tenacity.retry(
        stop=tenacity.stop_after_attempt(RETRY_ATTEMPTS),
        wait=tenacity.wait_exponential(multiplier=0.2, max=30),
        retry=tenacity.retry_if_exception_type(TransientError),
        reraise=True,
    )


def _call(i: int) -> None:
    """The downstream call the guards protect: nothing."""
    return None


call = _retrying()(_call)


def run_guarded(task: Task, redis_url: str, prefix: str, i: int) -> None:
    """The task body: limit, then the retried call through the breaker."""
    g = guards(redis_url, prefix)
    if not g.limiter.hit(g.item, "bench"):
        raise task.retry(countdown=1)
    return g.breaker.call(call, i)


def register_producer_task(app: Celery, redis_url: str) -> Task:
    """The same ``QueueOnce`` task on a producer app: ``apply_async`` takes the lock."""
    from celery_once import QueueOnce

    app.conf.ONCE = once_config(redis_url)

    @app.task(base=QueueOnce, name=NAME, once={"keys": ONCE_KEYS}, bind=True, shared=False)
    def offshelf_noop(self: Task, i: int, batch: str) -> None:
        raise RuntimeError("producer-side stub: runs in bench.offshelf_app")

    return offshelf_noop
