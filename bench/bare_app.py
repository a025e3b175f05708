"""Bare Celery, the baseline: ``celery -A bench.bare_app worker``.

The same broker, result backend, acks (late, on failure, reject on worker lost),
prefetch, events, JSON, time limits and shutdown settings as ``worker.app`` — read from
the same ``RELIABLE_`` settings — but no guards: no ``ReliableTask``, no reliable
consumer, no maintenance thread, plain Celery logging.

``python -m bench.bare_app`` (with the bench's environment) compares this configuration
with ``worker.app``'s and exits 1 on any difference, so the baseline cannot drift.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from celery import Celery

from bench import marks
from config import Settings, load_settings

# worker.app settings the baseline deliberately leaves out: they are the guards (the
# reliable consumer, the atomic-pop broker transport), loading of the service's tasks,
# logging set-up and beat.
NOT_SHARED = frozenset({
    "worker_consumer", "broker_transport", "include", "worker_hijack_root_logger",
    "beat_schedule", "beat_schedule_filename",
})


def bare_config(settings: Settings) -> dict[str, Any]:
    if settings.redis.url is None:
        raise SystemExit("bench.bare_app needs RELIABLE_REDIS__URL (no embedded Redis here)")
    url = settings.redis.url.get_secret_value()
    broker = settings.broker
    transport: dict[str, Any] = {
        "visibility_timeout": broker.visibility_timeout_seconds,
        "unacked_restore_interval": broker.unacked_restore_interval_seconds,
    }
    backend_transport: dict[str, Any] = {}
    if broker.global_keyprefix:
        transport["global_keyprefix"] = broker.global_keyprefix
        backend_transport["global_keyprefix"] = broker.global_keyprefix
    w = settings.worker
    return {
        "broker_url": broker.url.get_secret_value() if broker.url else url,
        "result_backend": (broker.result_backend_url.get_secret_value()
                           if broker.result_backend_url else url),
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_transport,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": w.prefetch_multiplier,
        "worker_concurrency": w.concurrency,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "worker_soft_shutdown_timeout": w.soft_shutdown_timeout_seconds,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": w.default_soft_time_limit_seconds,
        "task_time_limit": w.default_time_limit_seconds,
        "task_default_queue": broker.queue,
        "result_extended": True,
        "result_expires": settings.idempotency.result_ttl_seconds,
    }


settings = load_settings()
app = Celery("bench-bare")
app.conf.update(bare_config(settings))


@app.task(name="bench.noop")
def noop(i: int) -> None:
    """The baseline no-op: a plain Celery task."""
    return None


@app.task(name="bench.sleep")
def sleep(key: str, seconds: float) -> str:
    """The baseline revival task (acks late, reject on worker lost: from the config)."""
    return marks.sleep_once(key, seconds)


def differences() -> list[str]:
    """Settings where this app and ``worker.app`` disagree (imports ``worker.app``)."""
    from worker.app import app as reliable

    found = []
    for key, value in bare_config(settings).items():
        if reliable.conf[key] != value:
            found.append(f"{key}: bare={value!r} reliable={reliable.conf[key]!r}")
    from worker.app import celery_config, state_url

    for key in celery_config(reliable.settings, state_url(reliable.settings)):
        if key not in NOT_SHARED and key not in bare_config(settings):
            found.append(f"{key}: set by worker.app, missing from the baseline")
    return found


if __name__ == "__main__":
    problems = differences()
    print(json.dumps({"differences": problems}))
    sys.exit(1 if problems else 0)
