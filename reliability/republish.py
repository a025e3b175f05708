"""Republishing a message as the same logical work: one place for the mover and the DLQ.

The service publishes copies of messages itself: the mover publishes a parked message
when it is due (:mod:`reliability.deferral`), and an operator redrives a dead letter
(:mod:`reliability.dlq`). A copy must be the work the producer sent, not a look-alike,
so it keeps:

* the task name, arguments and the producer's headers (idempotency key, correlation id,
  deadline, tenant), plus the internal headers the caller says apply to this copy;
* the routing: exchange, routing key and priority. Celery sends a message that names a
  routing key but not its exchange to the app's default queue, not where the original
  went (the DLQ redrive did, before this module);
* Celery's ``expires`` and the producer's (hard, soft) time limits: without them a copy
  runs after the producer gave up on it, or under the worker's default limits;
* its place in the workflow (parent and root ids) and, where the caller wants it (the
  mover does, a redrive does not: it is a new task), the task id and retry count.

Only headers the service knows are carried (the producer contract and our own), so a
copy never forwards whatever else an envelope holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from reliability.delivery import INTERNAL_HEADERS, PRODUCER_HEADERS

# The headers a copy may carry: the producer contract (DESIGN §7) and our internal ones.
CARRIED_HEADERS = frozenset((*PRODUCER_HEADERS, *INTERNAL_HEADERS))


class Publisher(Protocol):
    """What republishing needs from a Celery app."""

    def send_task(self, name: str, args: Any = ..., kwargs: Any = ..., **options: Any) -> Any: ...


@dataclass(frozen=True)
class Copy:
    """A message to publish again as the same logical work (see the module docstring)."""

    task: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, Any] = field(default_factory=dict)
    # Delivery.routing: exchange, routing_key, priority ("" or None: not set).
    routing: Mapping[str, Any] = field(default_factory=dict)
    expires: str | None = None  # Celery's `expires`, ISO-8601
    time_limits: Sequence[float | None] | None = None  # the producer's (hard, soft) seconds
    parent_id: str | None = None
    root_id: str | None = None
    task_id: str | None = None  # None: Celery gives the copy a new id
    retries: int = 0

    def options(self) -> dict[str, Any]:
        """The ``send_task`` keyword arguments (all but name, args and kwargs)."""
        options: dict[str, Any] = {
            "headers": {
                k: v for k, v in self.headers.items() if k in CARRIED_HEADERS and v is not None
            },
            "retries": self.retries,
        }
        exchange, key = self.routing.get("exchange"), self.routing.get("routing_key")
        if exchange:
            options["exchange"] = exchange
            if key:
                options["routing_key"] = key
        elif key:
            # The default exchange routes by queue name. Celery sends a message with a
            # routing key but no exchange to its own default queue instead, so the copy
            # names the queue; not declared again (it held the original, and declaring it
            # with other arguments than its owner's would fail on RabbitMQ).
            options["queue"] = key
            options["declare"] = []
        if self.routing.get("priority") is not None:
            options["priority"] = self.routing["priority"]
        if self.expires:
            options["expires"] = self.expires
        if self.time_limits:
            options["time_limit"], options["soft_time_limit"] = self.time_limits
        for name in ("task_id", "parent_id", "root_id"):
            value = getattr(self, name)
            if value:
                options[name] = value
        return options


def republish(app: Publisher, copy: Copy) -> str:
    """Publish ``copy``; returns its task id. Raises whatever the publish raises (the
    caller keeps its parked message or DLQ entry until this returned)."""
    result = app.send_task(
        copy.task, args=list(copy.args), kwargs=dict(copy.kwargs), **copy.options()
    )
    return str(result.id)
