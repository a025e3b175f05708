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
from worker.celeryconfig import FUSED_BACKEND, celery_config

# worker.app settings the baseline deliberately leaves out: they are the guards (the
# reliable consumer, the atomic-pop broker transport), loading of the service's tasks,
# logging set-up and beat.
NOT_SHARED = frozenset(
    {
        "worker_consumer",
        "broker_transport",
        "include",
        "worker_hijack_root_logger",
        "beat_schedule",
        "beat_schedule_filename",
    }
)


def bare_config(settings: Settings) -> dict[str, Any]:
    """The service's own Celery configuration, minus the guards (``NOT_SHARED``)."""
    if settings.redis.url is None:
        raise SystemExit("bench.bare_app needs RELIABLE_REDIS__URL (no embedded Redis here)")
    config = celery_config(settings, settings.redis.url.get_secret_value())
    bare = {key: value for key, value in config.items() if key not in NOT_SHARED}
    # Celery's own Redis backend (the reliable stack fuses its completion into it).
    bare["result_backend"] = str(config["result_backend"]).removeprefix(f"{FUSED_BACKEND}+")
    return bare


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

    return [
        f"{key}: bare={value!r} reliable={reliable.conf[key]!r}"
        for key, value in bare_config(settings).items()
        if reliable.conf[key] != value and key != "result_backend"
    ]


if __name__ == "__main__":
    problems = differences()
    print(json.dumps({"differences": problems}))
    sys.exit(1 if problems else 0)
