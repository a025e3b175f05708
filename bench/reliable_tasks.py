"""The reliable stack's benchmark tasks, loaded through ``RELIABLE_WORKER__TASK_MODULES``.

``bench.reliable_noop`` declares idempotency (keyed by the SHA-256 of its arguments, so
each distinct ``i`` is a distinct key and none is skipped) and takes the default retry
policy from settings: the guards a typical task declares.
"""

from __future__ import annotations

from bench import marks
from reliability import ReliableTask
from worker.app import app


@app.task(base=ReliableTask, name="bench.reliable_noop", idempotent=True)
def reliable_noop(i: int) -> None:
    """The no-op under idempotency + retry: admission and completion, nothing else."""
    return None


@app.task(base=ReliableTask, name="bench.reliable_sleep", idempotency_key_args=("key",))
def reliable_sleep(key: str, seconds: float) -> str:
    """The revival task: keyed, sleeps on its first delivery only (see bench.marks)."""
    return marks.sleep_once(key, seconds)
