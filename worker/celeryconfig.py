"""Celery and runtime configuration derived from settings, without side effects.

Kept apart from :mod:`worker.app` (which builds the app and wires signals at import) so
tools such as the benchmark's bare-Celery baseline can use the very same configuration.
"""

from __future__ import annotations

from typing import Any

from config import Settings
from reliability.breaker import BreakerConfig
from reliability.degradation import DEFAULT_RULES, Level, Rule
from reliability.ratelimit import RateLimit
from reliability.retry import RetryPolicy
from reliability.runtime import RuntimeConfig
from reliability.transport import broker_connection
from worker.embedded import backend_url_for, broker_url_for, embedded_url
from worker.schedule import beat_schedule, redbeat_config

# The service's own tasks (beat maintenance); business tasks come from settings.
SERVICE_TASK_MODULES = ["worker.beat"]
FUSED_BACKEND = "reliability.backend:ReliableRedisBackend"
# Delivery records outlive the visibility timeout by this margin.
DELIVERY_TTL_MARGIN_SECONDS = 600


def state_url(settings: Settings) -> str:
    """The state store's URL: the configured one, else the embedded server's socket.

    Computing it starts nothing; whoever runs the service starts the embedded server
    (:func:`embedded_data_dir` says whether one is needed).
    """
    if settings.redis.url is not None:
        return settings.redis.url.get_secret_value()
    return embedded_url(settings.redis.data_dir)


def embedded_data_dir(settings: Settings) -> str | None:
    """The embedded server's data directory when no Redis URL is configured, else None."""
    return None if settings.redis.url is not None else str(settings.redis.data_dir)


def runtime_config(settings: Settings) -> RuntimeConfig:
    r = settings.retry
    return RuntimeConfig(
        lease_seconds=settings.idempotency.lease_ttl_seconds,
        result_ttl_seconds=settings.idempotency.result_ttl_seconds,
        max_redeliveries=settings.delivery.max_redeliveries,
        delivery_ttl_seconds=settings.broker.visibility_timeout_seconds
        + DELIVERY_TTL_MARGIN_SECONDS,
        ledger_max_len=settings.ledger.max_len,
        retry_policy=RetryPolicy(
            strategy=r.strategy,
            base_delay=r.base_delay_seconds,
            max_delay=r.max_delay_seconds,
            max_attempts=r.max_attempts,
            max_elapsed=r.max_elapsed_seconds,
            jitter=r.jitter,
        ),
        budget_ratio=r.budget_ratio,
        budget_min_retries_per_second=r.budget_min_retries_per_second,
        budget_window_seconds=r.budget_window_seconds,
        recheck_seconds=settings.deferral.in_progress_recheck_seconds,
        degradation_recheck_seconds=settings.degradation.recheck_seconds,
        dlq_max_entries=settings.dlq.max_entries,
        dlq_max_redrives=settings.dlq.max_redrives,
        store_wait_seconds=settings.redis.unavailable_wait_seconds,
        max_message_bytes=settings.broker.max_message_bytes,
    )


def celery_config(settings: Settings, url: str) -> dict[str, Any]:
    broker = settings.broker
    # Our transport (reliability/transport.py) for every Redis URL form: it closes kombu's
    # pop-then-record window and dead-letters items that are no message at all.
    broker_url, broker_transport = broker_connection(
        broker.url.get_secret_value() if broker.url else broker_url_for(url)
    )
    transport: dict[str, Any] = {
        "visibility_timeout": broker.visibility_timeout_seconds,
        "unacked_restore_interval": broker.unacked_restore_interval_seconds,
    }
    if broker_transport is not None:
        # One list per queue, so the transport can pop atomically (BLMOVE); messages a
        # producer sent with a priority are folded back into it by the maintenance sweep.
        transport["priority_steps"] = [0]
        transport["max_message_bytes"] = broker.max_message_bytes
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        # Publisher confirms: the mover deletes a parked message (and the DLQ an entry it
        # redrives) only after the broker confirmed the copy.
        transport["confirm_publish"] = True
    backend_transport: dict[str, Any] = {}
    if broker.global_keyprefix:
        transport["global_keyprefix"] = broker.global_keyprefix
        backend_transport["global_keyprefix"] = broker.global_keyprefix
    w = settings.worker
    return {
        "broker_url": broker_url,
        "broker_transport": broker_transport,
        # On the state store's Redis, results are written together with the completion
        # record (one round trip): reliability.backend.
        "result_backend": (
            broker.result_backend_url.get_secret_value()
            if broker.result_backend_url
            else f"{FUSED_BACKEND}+{backend_url_for(url)}"
        ),
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_transport,
        # JSON only: pickle is refused (and dead-lettered) by the consumer.
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
        # Never give up reconnecting: a worker that exits on a long Redis outage crash-loops.
        "broker_connection_max_retries": None,
        # The grace running tasks get at a warm shutdown; then worker.shutdown kills what
        # still runs and hands its messages back. A cold shutdown hands back at once.
        "worker_soft_shutdown_timeout": w.soft_shutdown_timeout_seconds,
        # Nothing waits inside an idle worker (deferrals are parked in Redis, not held as
        # ETA messages): an idle worker stops at once.
        "worker_enable_soft_shutdown_on_idle": False,
        # A broker blip must not kill running bodies (they would run again): they finish,
        # and their acks go through the new connection (reliability/transport.py).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_soft_time_limit": w.default_soft_time_limit_seconds,
        "task_time_limit": w.default_time_limit_seconds,
        "task_default_queue": broker.queue,
        "worker_consumer": "reliability.consumer:ReliableConsumer",
        "worker_hijack_root_logger": False,
        "result_extended": True,
        "result_expires": settings.idempotency.result_ttl_seconds,
        "beat_schedule": beat_schedule(settings),
        **redbeat_config(settings, state_url(settings)),
        "include": [*w.task_modules, *SERVICE_TASK_MODULES],
    }


def breaker_configs(settings: Settings) -> dict[str, BreakerConfig]:
    return {
        name: BreakerConfig(
            failure_threshold=b.failure_threshold,
            failure_rate_threshold=b.failure_rate_threshold,
            window_type=b.window_type,
            window_size=b.window_size,
            minimum_requests=b.minimum_requests,
            slow_call_seconds=b.slow_call_seconds,
            slow_call_rate_threshold=b.slow_call_rate_threshold,
            recovery_timeout=b.recovery_timeout_seconds,
            half_open_max_calls=b.half_open_max_calls,
            success_threshold=b.success_threshold,
            trial_lease_seconds=b.trial_lease_seconds,
        )
        for name, b in settings.breakers.items()
    }


def rate_limits(settings: Settings) -> dict[str, RateLimit]:
    return {
        name: RateLimit(name=name, **limit.model_dump())
        for name, limit in settings.rate_limits.items()
    }


def degradation_rules(settings: Settings) -> tuple[Rule, ...]:
    """The degradation rules: the settings' list, else the built-in defaults."""
    rules = settings.degradation.rules
    if rules is None:
        return DEFAULT_RULES
    return tuple(
        Rule(
            Level(r.level),
            component=r.component,
            status=r.status,
            breaker=r.breaker,
            breakers_open=r.breakers_open,
        )
        for r in rules
    )
