"""Breaker transitions, delivered once fleet-wide to logs, metrics and alert hooks.

The breaker scripts append every transition (including open -> half-open, which happens
by time, inside whichever admission first notices) to one Redis stream, exactly once.
The maintenance leader reads it through a consumer group and acknowledges each entry
after its hooks ran, so every transition is logged (``circuit_breaker_opened``,
``_half_open``, ``_closed``) and alerted once, and a leader that dies mid-way leaves its
pending entries to the next one (``XAUTOCLAIM``). Hooks follow seed 004: log, metric,
event and webhook hooks, each ``(event_type, message, context)``.
"""

from __future__ import annotations

import socket
from typing import Any

from reliability import metrics
from reliability.alerts import AlertHooks, log_hook
from reliability.breaker.config import EVENTS_STREAM
from reliability.errors import BackendUnavailable
from reliability.store import Store

EVENT_NAMES = {
    "open": "circuit_breaker_opened",
    "half_open": "circuit_breaker_half_open",
    "closed": "circuit_breaker_closed",
}
GROUP = "alerts"
# A leader that read entries and died leaves them pending; the next takes them after this.
CLAIM_IDLE_MS = 30_000


# Transitions back towards health are logged at info; opening (and any other alert) warns.
LOG_LEVELS = {"circuit_breaker_half_open": "info", "circuit_breaker_closed": "info"}
TRANSITION_EVENTS = frozenset(EVENT_NAMES.values())


def count_transition(event_type: str, _message: str, context: dict[str, Any]) -> None:
    """Metric hook: transitions counted once fleet-wide (other alerts ignored). The
    state itself is read from Redis by the fleet collector (:mod:`reliability.fleet_metrics`)."""
    if event_type not in TRANSITION_EVENTS:
        return
    metrics.BREAKER_TRANSITIONS.labels(context["breaker"], context["to"]).inc()


def default_hooks() -> AlertHooks:
    """Log and metric hooks only (the worker builds the full set: ``worker/alerting.py``)."""
    hooks = AlertHooks()
    hooks.add_log_hook(log_hook(LOG_LEVELS))
    hooks.add_metric_hook(count_transition)
    return hooks


class BreakerEvents:
    """Reads breaker transitions from the stream and hands each to the hooks once."""

    def __init__(
        self, store: Store, hooks: AlertHooks | None = None, consumer: str | None = None
    ) -> None:
        self.store = store
        self.hooks = hooks or default_hooks()
        self.consumer = consumer or socket.gethostname()
        self.stream = f"{store.keys.prefix}:{EVENTS_STREAM}"
        self._group_ready = False

    def _ensure_group(self, client: Any) -> None:
        if self._group_ready:
            return
        try:
            client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: it exists already
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def deliver(self, count: int = 100) -> int:
        """Deliver pending and new transitions; returns how many were delivered."""

        def read(client: Any) -> list[tuple[str, dict[str, str]]]:
            self._ensure_group(client)
            claimed = client.xautoclaim(
                self.stream,
                GROUP,
                self.consumer,
                min_idle_time=CLAIM_IDLE_MS,
                start_id="0-0",
                count=count,
            )
            entries = list(claimed[1]) if claimed else []
            fresh = client.xreadgroup(GROUP, self.consumer, {self.stream: ">"}, count=count)
            for _stream, rows in fresh or []:
                entries.extend(rows)
            return entries

        try:
            entries = self.store.call("breaker events", read)
        except BackendUnavailable:
            return 0
        for entry_id, fields in entries:
            if not fields:
                continue
            to = fields.get("to", "")
            event = EVENT_NAMES.get(to, f"circuit_breaker_{to}")
            context = {
                "breaker": fields.get("breaker", ""),
                "from": fields.get("from", ""),
                "to": to,
                "reason": fields.get("reason", ""),
                "mode": fields.get("mode", "normal"),
                "at": float(fields.get("at", 0)),
            }
            message = f"circuit breaker {context['breaker']} {context['from']} -> {to}"
            self.hooks.emit(event, message, context)
            self._ack(entry_id)
        return len(entries)

    def _ack(self, entry_id: str) -> None:
        """Acknowledge one delivered transition (it is not claimed again)."""
        self.store.call("breaker events ack", lambda c: c.xack(self.stream, GROUP, entry_id))
