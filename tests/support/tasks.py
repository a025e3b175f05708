"""Tasks that exist only for tests: each exercises one way a delivery can end.

Loaded by test workers through ``RELIABLE_WORKER__TASK_MODULES``. Side effects go to the
sandbox provider (so tests count them) or to Redis keys under the test prefix.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from typing import Any

from reliability import PermanentError, ReliableTask, RetryPolicy, TransientError
from reliability.degradation import LastGood
from reliability.delivery import current
from tasks.provider import post
from worker.app import app, runtime, settings

FAST_RETRY = RetryPolicy(
    strategy="fixed", base_delay=0.3, max_delay=1.0, max_attempts=3, jitter="none"
)


def _sandbox() -> str:
    return settings.providers.payment_base_url


@app.task(base=ReliableTask, name="test.echo")
def echo(value: Any) -> Any:
    """Returns its argument: the no-op task (no guards declared)."""
    return value


@app.task(base=ReliableTask, name="test.keyed_echo", idempotent=True)
def keyed_echo(value: Any) -> Any:
    return value


@app.task(
    base=ReliableTask, name="test.call", idempotency_key_args=("key",), retry_policy=FAST_RETRY
)
def call(key: str, endpoint: str = "webhooks") -> dict[str, Any]:
    """One POST to the sandbox with the delivery's key and fence."""
    return post(f"{_sandbox()}/{endpoint}", {"key": key})


@app.task(
    base=ReliableTask, name="test.sleep", idempotency_key_args=("key",), retry_policy=FAST_RETRY
)
def sleep(key: str, seconds: float) -> str:
    time.sleep(seconds)
    return key


@app.task(
    base=ReliableTask, name="test.crash", idempotency_key_args=("key",), retry_policy=FAST_RETRY
)
def crash(key: str, times: int) -> str:
    """Kills its own pool child the first ``times`` deliveries (counted in Redis)."""
    counter = f"{runtime.store.keys.prefix}:test:crash:{key}"
    n = runtime.store.client.incr(counter)
    runtime.store.client.expire(counter, 600)
    if n <= times:
        os.kill(os.getpid(), signal.SIGKILL)
    return key


@app.task(
    base=ReliableTask, name="test.slow_call", idempotency_key_args=("key",), retry_policy=FAST_RETRY
)
def slow_call(key: str, before: float, endpoint: str = "webhooks") -> dict[str, Any]:
    """Waits ``before`` seconds (a window to pause or kill it), then calls the sandbox."""
    time.sleep(before)
    return post(f"{_sandbox()}/{endpoint}", {"key": key})


@app.task(base=ReliableTask, name="test.spawn")
def spawn(value: str) -> str:
    """Publishes a child task; it must inherit correlation id and deadline."""
    child = app.send_task("test.context", args=[value])
    return child.id


@app.task(base=ReliableTask, name="test.context")
def context(value: str) -> dict[str, Any]:
    d = current()
    assert d is not None
    return {
        "value": value,
        "correlation_id": d.correlation_id,
        "deadline": d.deadline_header,
        "tenant_id": d.tenant_id,
    }


@app.task(
    base=ReliableTask, name="test.flaky", idempotency_key_args=("key",), retry_policy=FAST_RETRY
)
def flaky(key: str, fail_times: int) -> str:
    counter = f"{runtime.store.keys.prefix}:test:flaky:{key}"
    n = runtime.store.client.incr(counter)
    runtime.store.client.expire(counter, 600)
    if n <= fail_times:
        raise TransientError(f"flaky failure {n}")
    return f"{key}:{n}"


@app.task(
    base=ReliableTask,
    name="test.stubborn_sleep",
    idempotency_key_args=("key",),
    retry_policy=FAST_RETRY,
)
def stubborn_sleep(key: str, seconds: float) -> str:
    """Sleeps ``seconds`` through any soft time limit: only the hard limit stops it.

    Each delivery that starts increments ``<prefix>:test:stubborn:<key>``.
    """
    from celery.exceptions import SoftTimeLimitExceeded

    counter = f"{runtime.store.keys.prefix}:test:stubborn:{key}"
    runtime.store.client.incr(counter)
    runtime.store.client.expire(counter, 600)
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            continue
    return key


BACKOFF_RETRY = RetryPolicy(
    strategy="exponential",
    base_delay=0.5,
    multiplier=2,
    max_delay=5.0,
    max_attempts=3,
    jitter="none",
)  # delays 0.5 s, 1.0 s
SLOW_RETRY = RetryPolicy(
    strategy="fixed", base_delay=4.0, max_delay=4.0, max_attempts=3, jitter="none"
)  # longer than a short broker visibility timeout


@app.task(
    base=ReliableTask,
    name="test.backoff_call",
    idempotency_key_args=("key",),
    retry_policy=BACKOFF_RETRY,
)
def backoff_call(key: str) -> dict[str, Any]:
    """Like test.call, retried on an exponential schedule (0.5 s, 1.0 s)."""
    return post(f"{_sandbox()}/webhooks", {"key": key})


@app.task(
    base=ReliableTask,
    name="test.slow_flaky",
    idempotency_key_args=("key",),
    retry_policy=SLOW_RETRY,
)
def slow_flaky(key: str, fail_times: int) -> str:
    """Fails its first ``fail_times`` runs, retried after 4 s.

    Each run appends its start time to the list ``<prefix>:test:slow_flaky:<key>``.
    """
    runs = f"{runtime.store.keys.prefix}:test:slow_flaky:{key}"
    n = runtime.store.client.rpush(runs, time.time())
    runtime.store.client.expire(runs, 600)
    if n <= fail_times:
        raise TransientError(f"slow flaky failure {n}")
    return f"{key}:{n}"


@app.task(base=ReliableTask, name="test.leak_secret", retry_policy=FAST_RETRY)
def leak_secret(note: str) -> str:
    """Always fails with the configured payment API key in its message (it must be masked)."""
    secret = settings.providers.payment_api_key
    value = secret.get_secret_value() if secret is not None else ""
    raise TransientError(f"token {value} rejected ({note})")


@app.task(
    base=ReliableTask,
    name="test.guarded_call",
    idempotency_key_args=("key",),
    breaker="test-breaker",
    retry_policy=FAST_RETRY,
)
def guarded_call(key: str) -> dict[str, Any]:
    """A sandbox call behind the breaker named "test-breaker" (configured by the test)."""
    return post(f"{_sandbox()}/webhooks", {"key": key})


@app.task(base=ReliableTask, name="test.limited", rate_limits=("test-limit",))
def limited(key: str, tenant: str = "-") -> float:
    """Records when it was admitted (the admission script's Redis time) in
    `<prefix>:test:admitted` (limit tests)."""
    client = runtime.store.client
    d = current()
    assert d is not None and d.admitted_at is not None
    stamp = d.admitted_at
    client.rpush(f"{runtime.store.keys.prefix}:test:admitted", f"{stamp:.6f}:{key}:{tenant}")
    return stamp


def cached_answer(key: str) -> dict[str, Any]:
    """The fallback of test.with_fallback: a cached value, marked stale (none for the key
    "no-cache": the fallback then raises)."""
    if key == "no-cache":
        raise LookupError("no cached answer for no-cache")
    return {"key": key, "stale": True}


@app.task(
    base=ReliableTask,
    name="test.with_fallback",
    idempotency_key_args=("key",),
    breaker="test-breaker",
    breaker_fallback=cached_answer,
    retry_policy=FAST_RETRY,
)
def with_fallback(key: str) -> dict[str, Any]:
    """A sandbox call whose open breaker is answered by `cached_answer` instead."""
    return post(f"{_sandbox()}/webhooks", {"key": key})


@app.task(
    base=ReliableTask, name="test.hold_gil", idempotency_key_args=("key",), retry_policy=FAST_RETRY
)
def hold_gil(key: str, seconds: int) -> dict[str, Any]:
    """Holds the GIL for ``seconds`` (a C call through ctypes.PyDLL, which keeps it), then
    calls the sandbox: no thread in this process runs meanwhile."""
    ctypes.PyDLL(None).sleep(int(seconds))
    return post(f"{_sandbox()}/webhooks", {"key": key})


def _hold_gil(seconds: int) -> None:
    """One C call of ``seconds`` that holds the GIL with every signal but SIGKILL
    blocked: no Python code (a soft time limit, a SIGTERM handler) runs in this process
    until it returns — the worst stuck pool child there is (a huge regex, a C library)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        ctypes.PyDLL(None).sleep(int(seconds))  # PyDLL: the GIL stays held
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _sleep_through_soft_limits(seconds: float) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            continue


@app.task(
    base=ReliableTask,
    name="test.stuck_call",
    idempotency_key_args=("key",),
    retry_policy=FAST_RETRY,
)
def stuck_call(
    key: str, seconds: int, times: int = 1, mode: str = "gil", pad: str = ""
) -> dict[str, Any]:
    """Its first ``times`` deliveries are stuck for ``seconds`` (``mode`` "gil": holding
    the GIL, deaf to every signal but SIGKILL; "stubborn": sleeping through its soft time
    limit), then every delivery that gets there makes one sandbox call (an effect the
    test counts). ``pad`` only makes the message big.

    Each delivery that starts increments ``<prefix>:test:stuck:<key>``.
    """
    counter = f"{runtime.store.keys.prefix}:test:stuck:{key}"
    n = runtime.store.client.incr(counter)
    runtime.store.client.expire(counter, 600)
    if n <= times:
        if mode == "gil":
            _hold_gil(seconds)
        else:
            _sleep_through_soft_limits(seconds)
    return post(f"{_sandbox()}/webhooks", {"key": key})


@app.task(base=ReliableTask, name="test.shape", retry_policy=FAST_RETRY)
def shape(key: str, fail_times: int, permanent: bool = False) -> int:
    """Records how each delivery arrived — routing, priority, expiry, time limits, ids and
    producer headers, as Celery's request shows them — in ``<prefix>:test:shape:<key>``
    (one JSON object per delivery), then fails the first ``fail_times`` deliveries:
    transiently (retried through the mover) or, with ``permanent``, into the DLQ."""
    request = shape.request
    info = request.delivery_info or {}
    d = current()
    assert d is not None
    record = {
        "exchange": info.get("exchange"),
        "routing_key": info.get("routing_key"),
        "priority": info.get("priority"),
        "expires": request.expires,
        "timelimit": list(request.timelimit or (None, None)),
        "task_id": request.id,
        "retries": request.retries,
        "parent_id": request.parent_id,
        "root_id": request.root_id,
        "correlation_id": d.correlation_id,
        "idempotency_key": d.idempotency_header,
        "deadline": d.deadline_header,
        "tenant_id": d.tenant_id,
        "defer_id": d.defer_id,
        "redrive_count": d.redrive_count,
    }
    runs = f"{runtime.store.keys.prefix}:test:shape:{key}"
    n = int(runtime.store.client.rpush(runs, json.dumps(record)))
    runtime.store.client.expire(runs, 600)
    if n <= fail_times:
        raise (PermanentError if permanent else TransientError)(f"shape failure {n}")
    return n


# -- degradation levels (tests/test_degradation_fleet.py) --------------------------------


def degraded_default(key: str) -> dict[str, Any]:
    """The second link of test.deg_fallback's chain: a default answer (none for keys
    starting with "none": the chain is then exhausted and the delivery deferred)."""
    if key.startswith("none"):
        raise LookupError(f"no default for {key}")
    return {"default": key}


@app.task(base=ReliableTask, name="test.deg_defer", degradation={"SEVERE": "defer"})
def deg_defer(key: str) -> dict[str, Any]:
    return post(f"{_sandbox()}/webhooks", {"key": key})


@app.task(
    base=ReliableTask,
    name="test.deg_skip",
    idempotency_key_args=("key",),
    degradation={"SEVERE": "skip", "CRITICAL": "skip"},
)
def deg_skip(key: str) -> dict[str, Any]:
    return post(f"{_sandbox()}/webhooks", {"key": key})


@app.task(
    base=ReliableTask,
    name="test.deg_fallback",
    degradation={"SEVERE": "fallback"},
    degradation_fallback=(LastGood(key_args=("key",)), degraded_default),
)
def deg_fallback(key: str) -> dict[str, Any]:
    return post(f"{_sandbox()}/webhooks", {"key": key})


@app.task(base=ReliableTask, name="test.deg_other", degradation={"CRITICAL": "skip"})
def deg_other(key: str) -> dict[str, Any]:
    """Declares only CRITICAL: it runs at every other level."""
    return post(f"{_sandbox()}/webhooks", {"key": key})
