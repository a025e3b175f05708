"""Alert hooks (seed 004): every alert the service raises goes through one object.

An alert is ``(event_type, message, context)``: breaker transitions, a breaker open too
long or flapping, DLQ entries held for an operator, retry anomalies and spikes. Hooks
are grouped as seed 004 names them — log, metric, webhook — and each runs on its own: a
failing hook is logged and never stops the others, nor the job that raised the alert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import structlog

log = structlog.get_logger("reliability.alerts")

Hook = Callable[[str, str, dict[str, Any]], None]


class AlertHooks:
    """Extensible alert hooks (seed 004): log, metric, webhook."""

    def __init__(self) -> None:
        self.log_hooks: list[Hook] = []
        self.metric_hooks: list[Hook] = []
        self.webhook_hooks: list[Hook] = []

    def add_log_hook(self, hook: Hook) -> None:
        self.log_hooks.append(hook)

    def add_metric_hook(self, hook: Hook) -> None:
        self.metric_hooks.append(hook)

    def add_webhook_hook(self, hook: Hook) -> None:
        self.webhook_hooks.append(hook)

    def add_webhook_url(self, url: str, timeout: float = 5.0) -> None:
        """POST every event as JSON to ``url`` (e.g. a PagerDuty or Slack relay)."""

        def post(event_type: str, message: str, context: dict[str, Any]) -> None:
            httpx.post(
                url, json={"event": event_type, "message": message, **context}, timeout=timeout
            ).raise_for_status()

        self.webhook_hooks.append(post)

    def emit(self, event_type: str, message: str, context: dict[str, Any]) -> None:
        """Run every hook; a failing hook is logged and never stops the others."""
        for hook in (*self.log_hooks, *self.metric_hooks, *self.webhook_hooks):
            try:
                hook(event_type, message, context)
            except Exception as exc:
                log.warning(
                    "alert_hook_failed",
                    hook=getattr(hook, "__name__", repr(hook)),
                    event_type=event_type,
                    error=str(exc),
                )
