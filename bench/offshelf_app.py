"""The off-the-shelf stack's worker: ``celery -A bench.offshelf_app worker``.

Bare Celery's configuration (:func:`bench.bare_app.bare_config`, the same settings as
``worker.app`` minus the guards) plus celery-once, pybreaker, limits and tenacity on one
no-op task (see :mod:`bench.offshelf`). Needs ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

from celery import Celery, Task
from celery_once import QueueOnce

from bench import offshelf
from bench.bare_app import bare_config, settings

# bare_app has refused to start without a Redis URL already.
REDIS_URL = settings.redis.url.get_secret_value() if settings.redis.url else ""
PREFIX = settings.redis.key_prefix

app = Celery("bench-offshelf")
app.conf.update(bare_config(settings))
app.conf.ONCE = offshelf.once_config(REDIS_URL)


@app.task(base=QueueOnce, name=offshelf.NAME, once={"keys": offshelf.ONCE_KEYS}, bind=True)
def offshelf_noop(self: Task, i: int, batch: str) -> None:
    """The no-op under celery-once, a Redis-backed pybreaker, limits and tenacity."""
    return offshelf.run_guarded(self, REDIS_URL, PREFIX, i)
