"""The service's alert hooks, built from settings in one place.

Breaker transitions (:mod:`worker.signals`) and every beat job raise alerts through the
:class:`~reliability.alerts.AlertHooks` this returns: ``alert_hooks(settings, runtime)
.emit(event_type, message, context)``. Every payload is masked with the runtime's masker
(configured secrets, sensitive keys) before any hook sees it.
"""

from __future__ import annotations

from config import Settings
from reliability.alerts import AlertHooks, count_alert, event_stream_hook, log_hook, webhook_hook
from reliability.breaker.alerts import LOG_LEVELS, count_transition
from reliability.runtime import Runtime


def alert_hooks(settings: Settings, runtime: Runtime, *, log: bool = True) -> AlertHooks:
    """Log, metric (alerts by event type; breaker transitions and state), the event stream
    ``P:alerts`` and, when ``RELIABLE_ALERTS__WEBHOOK_URL`` is set, the webhook.

    ``log=False`` for CLI commands, which print what they did themselves."""
    config = settings.alerts
    hooks = AlertHooks(runtime.masker)
    if log:
        hooks.add_log_hook(log_hook(LOG_LEVELS))
    hooks.add_metric_hook(count_alert)
    hooks.add_metric_hook(count_transition)
    hooks.add_event_hook(event_stream_hook(runtime.store, config.stream_max_len))
    if config.webhook_url is not None:
        hooks.add_webhook_hook(
            webhook_hook(
                config.webhook_url.get_secret_value(),
                timeout=config.webhook_timeout_seconds,
                attempts=config.webhook_attempts,
                max_seconds=config.webhook_max_seconds,
                backoff_seconds=config.webhook_backoff_seconds,
            )
        )
    return hooks
