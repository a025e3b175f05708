"""Alert hooks (seed 004): every alert the service raises goes through one object.

An alert is ``(event_type, message, context)``: breaker transitions, a breaker open too
long or flapping, DLQ entries held for an operator, retry anomalies and spikes. Hooks
are grouped as seed 004 names them — log, metric, event and webhook hooks — and each
runs on its own: a failing hook is logged and counted, and never stops the others nor
the job that raised the alert. Every hook sees the payload masked (configured secrets,
values under sensitive keys, the patterns of :mod:`reliability.patterns`).

Ready-made hooks: :func:`log_hook`, :func:`count_alert` (a Prometheus counter by event
type), :func:`event_stream_hook` (a bounded Redis stream ``P:alerts`` that operators and
the ops API read with :func:`recent_alerts`) and :func:`webhook_hook` (a JSON POST
retried with backoff, bounded in attempts and total time).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, cast

import httpx
import structlog
from tenacity import Retrying, retry_if_exception_type

from reliability.metrics import ALERTS, HOOK_FAILURES
from reliability.security import Masker
from reliability.store import Store

log = structlog.get_logger("reliability.alerts")

Hook = Callable[[str, str, dict[str, Any]], None]

ALERTS_STREAM = "alerts"
# Entries kept in P:alerts (alerts are rare: trimmed exactly).
DEFAULT_STREAM_MAX_LEN = 10_000
# Statuses a webhook receiver may answer differently on the next attempt.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class WebhookFailed(Exception):
    """The webhook receiver did not accept the alert (the message never holds its URL)."""


class RetryableWebhookError(WebhookFailed):
    """A transport error or a status worth another attempt (:data:`RETRY_STATUSES`)."""


class AlertHooks:
    """Extensible alert hooks (seed 004): log, metric, event and webhook hooks.

    ``masker`` masks every payload before any hook sees it (default: patterns and
    sensitive keys only; the worker passes its masker, which knows the secrets).
    """

    def __init__(self, masker: Masker | None = None) -> None:
        self.masker = masker or Masker()
        self.log_hooks: list[Hook] = []
        self.metric_hooks: list[Hook] = []
        self.event_hooks: list[Hook] = []
        self.webhook_hooks: list[Hook] = []

    def add_log_hook(self, hook: Hook) -> None:
        self.log_hooks.append(hook)

    def add_metric_hook(self, hook: Hook) -> None:
        self.metric_hooks.append(hook)

    def add_event_hook(self, hook: Hook) -> None:
        self.event_hooks.append(hook)

    def add_webhook_hook(self, hook: Hook) -> None:
        self.webhook_hooks.append(hook)

    def add_webhook_url(self, url: str, timeout: float = 5.0, **retry: Any) -> None:
        """POST every event as JSON to ``url`` (a pager relay): :func:`webhook_hook`."""
        self.webhook_hooks.append(webhook_hook(url, timeout=timeout, **retry))

    def emit(self, event_type: str, message: str, context: Mapping[str, Any]) -> None:
        """Run every hook on the masked payload; a failing hook is logged and counted, and
        never stops the others (nor the caller: this never raises)."""
        try:
            message = self.masker.text(message)
            masked = self.masker.data(dict(context))
        except Exception as exc:  # a context that cannot be copied: still alert, bare
            message, masked = self.masker.text(message), {"context_error": repr(type(exc))}
        groups = (
            ("log", self.log_hooks),
            ("metric", self.metric_hooks),
            ("event", self.event_hooks),
            ("webhook", self.webhook_hooks),
        )
        for kind, hooks in groups:
            for hook in hooks:
                try:
                    hook(event_type, message, dict(masked))
                except Exception as exc:
                    HOOK_FAILURES.labels(kind).inc()
                    log.warning(
                        "alert_hook_failed",
                        hook=getattr(hook, "__name__", type(hook).__name__),
                        kind=kind,
                        event_type=event_type,
                        error=self.masker.text(str(exc)),
                    )


def log_hook(levels: Mapping[str, str] | None = None) -> Hook:
    """Log each alert as its own event name, at ``levels[event_type]`` (default warning)."""
    known = dict(levels or {})

    def log_alert(event_type: str, message: str, context: dict[str, Any]) -> None:
        # Context keys that structlog or this call own are renamed, never dropped.
        fields = {
            (f"context_{k}" if k in ("event", "message") else k): v for k, v in context.items()
        }
        getattr(log, known.get(event_type, "warning"))(event_type, message=message, **fields)

    return log_alert


def count_alert(event_type: str, _message: str, _context: dict[str, Any]) -> None:
    """Metric hook: ``reliable_alerts_total{event_type}``."""
    ALERTS.labels(event_type).inc()


def event_stream_hook(store: Store, max_len: int = DEFAULT_STREAM_MAX_LEN) -> Hook:
    """Append each alert to the stream ``P:alerts``, keeping the newest ``max_len``."""
    stream = f"{store.keys.prefix}:{ALERTS_STREAM}"

    def event_stream(event_type: str, message: str, context: dict[str, Any]) -> None:
        fields: dict[Any, Any] = {
            "event": event_type,
            "message": message,
            "context": json.dumps(context, default=str, separators=(",", ":")),
            "at": f"{time.time():.6f}",
        }
        store.call(
            "alert stream", lambda c: c.xadd(stream, fields, maxlen=max_len, approximate=False)
        )

    return event_stream


def recent_alerts(store: Store, count: int = 50) -> list[dict[str, Any]]:
    """The newest alerts of ``P:alerts`` first: id, event, message, context, at."""
    stream = f"{store.keys.prefix}:{ALERTS_STREAM}"
    rows = cast("list[Any]", store.call("alert read", lambda c: c.xrevrange(stream, count=count)))
    return [
        {
            "id": entry_id,
            "event": fields.get("event", ""),
            "message": fields.get("message", ""),
            "context": json.loads(fields.get("context") or "{}"),
            "at": float(fields.get("at") or 0),
        }
        for entry_id, fields in rows
    ]


def webhook_hook(
    url: str,
    *,
    timeout: float = 5.0,
    attempts: int = 3,
    max_seconds: float = 10.0,
    backoff_seconds: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Hook:
    """POST ``{"event", "message", **context}`` as JSON to ``url``.

    Transport errors and :data:`RETRY_STATUSES` are retried (tenacity) after
    ``backoff_seconds``, doubling, for at most ``attempts`` attempts and ``max_seconds`` in
    all: no attempt starts after the wait would pass that budget and each attempt's timeout
    is cut to the time left, so an alert never holds the job that raised it longer. Every
    attempt of one alert carries the same ``Idempotency-Key`` so a receiver can drop a
    repeat. Errors never hold the URL (it may carry a token). ``sleep`` and ``clock`` are
    for tests.
    """

    def webhook(event_type: str, message: str, context: dict[str, Any]) -> None:
        payload = {**context, "event": event_type, "message": message}
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        deadline = clock() + max_seconds

        def post() -> None:
            left = deadline - clock()
            if left <= 0:
                raise WebhookFailed(f"no time left of {max_seconds:g}s")
            try:
                response = httpx.post(
                    url, json=payload, headers=headers, timeout=min(timeout, left)
                )
            except httpx.TransportError as exc:
                raise RetryableWebhookError(f"webhook unreachable: {type(exc).__name__}") from None
            if response.status_code in RETRY_STATUSES:
                raise RetryableWebhookError(f"webhook answered {response.status_code}")
            if not response.is_success:
                raise WebhookFailed(f"webhook answered {response.status_code}")

        def pause(state: Any) -> float:
            return float(backoff_seconds * 2.0 ** (int(state.attempt_number) - 1))

        def stop(state: Any) -> bool:  # no attempt left, or none that could start in time
            return bool(state.attempt_number >= attempts or clock() + pause(state) >= deadline)

        retrying = Retrying(
            stop=stop,
            wait=pause,
            retry=retry_if_exception_type(RetryableWebhookError),
            sleep=sleep,
            reraise=True,
        )
        retrying(post)

    return webhook
