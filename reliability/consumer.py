"""``ReliableConsumer``: no message is dropped before the pipeline runs.

Celery's consumer acks or rejects some messages before any task code exists for them:
an unknown task name, a body that cannot be decoded (a refused pickle included), a
message of no known format. Celery logs and discards them; the ``task_unknown`` signal
fires only after the reject. This consumer writes each one to the DLQ as ``poison``
with the reason — masked, the raw body kept base64-encoded and never deserialised —
and only then lets Celery drop it. When the store cannot be reached the message is
requeued instead, so nothing is acked unwritten.
"""

from __future__ import annotations

import functools
from typing import Any

import structlog
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer
from celery.worker.state import active_requests, reserved_requests
from vine import promise

from reliability import transport
from reliability.dropped import body_bytes, dead_letter_message, dead_letter_raw
from reliability.poison import Poison, body_shape_problem, check_size
from reliability.runtime import runtime_of

log = structlog.get_logger("reliability.consumer")


def _running_tags() -> set[str]:
    return {str(r.message.delivery_tag) for r in tuple(active_requests) if not r.acknowledged}


# Delivery tags of messages this process holds unacked but will never ack (the broker
# connection they came on is gone); restored to the queue after reconnecting.
_orphaned_tags: list[str] = []


def hand_back(tag: Any) -> None:
    """Restore this message after the next reconnect (its own delivery can never ack)."""
    if tag:
        _orphaned_tags.append(str(tag))


class ReliableConsumer(Consumer):
    """Celery's consumer, dead-lettering every message it would drop, before the ack.

    It also hands back messages Celery forgets when the broker connection drops: the
    reserved (prefetched) requests that never started, and running ones Celery
    cancelled (see ``ReliableRequest.cancel``). Their messages stay unacked in Redis,
    where Celery would leave them for the visibility timeout (an hour); after
    reconnecting they are restored by delivery tag.
    """

    connection_errors: tuple[type[BaseException], ...]  # set by Celery; not in the stubs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = runtime_of(self.app)
        # Raw items the transport finds unreadable reach the DLQ through this process.
        transport.set_poison_sink(functools.partial(dead_letter_raw, self.runtime))
        # Messages of tasks still running are not restored after a reconnect (a second copy
        # would run beside them); they are acked through the new connection when they end.
        transport.set_running_tags(_running_tags)

    def create_task_handler(self, promise: Any = promise) -> Any:
        """Celery's handler, behind two checks: a size limit on the body before anything
        decodes it, and a last line of defence — a message Celery's own code raises on
        (not a connection error) is dead-lettered as poison instead of stopping the
        worker."""
        handle = super().create_task_handler(promise)
        max_bytes = self.runtime.config.max_message_bytes
        # kombu's Redis transport counts KeyError as a connection error (old redis-py); a
        # KeyError from Celery's handler is about the message, so it must not restart the
        # consumer (the message would be restored and fail again, forever).
        connection_errors = tuple(e for e in self.connection_errors if e is not KeyError)

        def on_task_received(message: Any) -> Any:
            try:
                check_size(len(body_bytes(message)), max_bytes)
            except Poison as poison:
                reason = f"{poison.kind}: {poison.reason}"
                if self._dead_letter(message, reason, poison, decode=False):
                    message.ack()
                return None
            problem = _protocol2_body_problem(message)
            if problem:
                self.on_invalid_task(None, message, InvalidTaskError(problem))
                return None
            try:
                return handle(message)
            except connection_errors:
                raise
            except Exception as exc:
                # Celery's own code failed on this message (possibly after acking it):
                # record it if nothing did yet, settle it, and keep consuming.
                log.error(
                    "task_message_handler_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    exc_info=True,
                )
                reason = f"malformed task message: {type(exc).__name__}: {exc}"[:500]
                task = self._task_of(message)
                if self._dead_letter(message, reason, exc, task=task) and not message.acknowledged:
                    message.ack()
                return None

        return on_task_received

    def on_close(self) -> None:
        for request in tuple(reserved_requests):
            if request.acknowledged or request in active_requests:
                continue
            hand_back(request.delivery_info.get("delivery_tag"))
        super().on_close()

    def connect(self) -> Any:
        connection = super().connect()
        if _orphaned_tags:
            qos = getattr(connection.default_channel, "qos", None)
            restored = 0
            while _orphaned_tags:
                tag = _orphaned_tags.pop()
                if qos is not None and hasattr(qos, "restore_by_tag"):
                    qos.restore_by_tag(tag, leftmost=False)
                    restored += 1
            log.warning("messages_restored_after_reconnect", count=restored)
        return connection

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        reason = f"unknown task {name!r}: not registered"
        # Celery's own handler stores the NotRegistered FAILURE result.
        if self._dead_letter(message, reason, exc, result=False):
            super().on_unknown_task(body, message, exc)

    def _dead_letter(
        self,
        message: Any,
        reason: str,
        error: BaseException | None,
        *,
        task: Any = None,
        decode: bool = True,
        result: bool = True,
    ) -> bool:
        """Dead-letter a message Celery would drop (``result``: store its FAILURE result)."""
        backend = self.app.backend if result else None
        return dead_letter_message(
            self.runtime, message, reason, error, decode=decode, task=task, backend=backend
        )

    def _task_of(self, message: Any) -> Any:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = headers.get("task")
        return self.app.tasks.get(name) if isinstance(name, str) else None

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        reason = f"invalid task message ({message.content_type}): {exc}"
        if self._dead_letter(message, reason, exc, task=self._task_of(message)):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = f"undecodable body ({message.content_type}): {exc}"
        if self._dead_letter(message, reason, exc, task=self._task_of(message)):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        reason = "message of unknown format (no task header)"
        if self._dead_letter(message, reason, None):
            super().on_unknown_message(body, message)


def _protocol2_body_problem(message: Any) -> str | None:
    """A protocol-2 message (a ``task`` header) whose body is not ``[args, kwargs, embed]``.

    The body is decoded once either way: kombu caches ``message.payload`` and Celery's
    handler reads it next. A body that does not decode is left to Celery's decode error."""
    if "task" not in (message.headers or {}):
        return None
    try:
        payload = message.payload
    except Exception:
        return None
    problem = body_shape_problem(payload)
    return None if problem is None else f"malformed task message: {problem}"
