"""The reliable stack's benchmark tasks, loaded through ``RELIABLE_WORKER__TASK_MODULES``.

``bench.reliable_noop`` declares idempotency (keyed by the SHA-256 of its arguments, so
each distinct ``i`` is a distinct key and none is skipped) and takes the default retry
policy from settings: the guards a typical task declares. ``bench.guarded_noop``
declares every guard (issue 3): idempotency, a retry policy, a degradation plan (the
level is NORMAL: it runs), a circuit breaker and a rate limit that never delays.
``bench.limited_noop`` only has a global rate limit and stamps its admission time, Redis
time (the utilisation bench).
"""

from __future__ import annotations

from bench import guard_settings, marks
from reliability import ReliableTask, current
from reliability.retry import RetryPolicy
from reliability.runtime import get_runtime
from worker.app import app


@app.task(base=ReliableTask, name="bench.reliable_noop", idempotent=True)
def reliable_noop(i: int) -> None:
    """The no-op under idempotency + retry: admission and completion, nothing else."""
    return None


@app.task(
    base=ReliableTask,
    name="bench.guarded_noop",
    idempotent=True,
    retry_policy=RetryPolicy(max_attempts=5),
    breaker=guard_settings.BREAKER,
    rate_limits=(guard_settings.LIMIT,),
    degradation=guard_settings.DEGRADATION,
)
def guarded_noop(i: int) -> None:
    """The no-op under all guards: one admission script checks idempotency, the
    degradation level, the breaker and the limit; one completion script records the
    result and settles the breaker."""
    return None


@app.task(
    base=ReliableTask, name="bench.limited_noop", rate_limits=(guard_settings.UTILISATION_LIMIT,)
)
def limited_noop(i: int) -> None:
    """Admitted by the global limit: stamps its admission (the admission script's Redis
    time, which the limit governs) for the utilisation."""
    store = get_runtime().store
    d = current()
    store.run(
        guard_settings.STAMP,
        [guard_settings.admitted_key(store.keys.prefix)],
        [d.admitted_at if d is not None and d.admitted_at else ""],
        "bench stamp",
    )


@app.task(base=ReliableTask, name="bench.reliable_sleep", idempotency_key_args=("key",))
def reliable_sleep(key: str, seconds: float) -> str:
    """The revival task: keyed, sleeps on its first delivery only (see bench.marks)."""
    return marks.sleep_once(key, seconds)
