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

import base64
import inspect
import json
from typing import Any

import structlog
from celery.worker.consumer import Consumer

from reliability import metrics
from reliability.delivery import PRODUCER_HEADERS
from reliability.dlq import DeadLetter, FailureClass
from reliability.errors import BackendUnavailable
from reliability.reprs import sensitive_of
from reliability.runtime import get_runtime
from reliability.sensitive import changed_arguments

log = structlog.get_logger("reliability.consumer")

# Raw bodies kept in a DLQ entry are capped at this many bytes.
MAX_RAW_BODY_BYTES = 64 * 1024
# The consumer loop must not stall long on an unreachable store: wait this, then requeue.
CONSUMER_STORE_WAIT_SECONDS = 2.0


def _decoded_json(message: Any) -> Any:
    if message.content_type != "application/json":
        return None
    try:
        return json.loads(message.body)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None


def envelope_for(message: Any, reason: str, error: BaseException | None,
                 task: Any = None) -> DeadLetter:
    """A DLQ envelope for a message that never reached a task (``task``: the registered
    task of that name, if any, whose sensitive arguments are masked whole)."""
    rt = get_runtime()
    headers = dict(message.headers or {})
    body = _decoded_json(message)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    raw = None
    if isinstance(body, list) and len(body) >= 2:
        args, kwargs = list(body[0] or []), dict(body[1] or {})
    else:
        data = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        raw = base64.b64encode(rt.masker.raw(data[:MAX_RAW_BODY_BYTES])).decode()
    producer = {k: headers[k] for k in PRODUCER_HEADERS if headers.get(k) is not None}
    info = message.delivery_info or {}
    masked_args, masked_kwargs = rt.masker.call(args, kwargs, sensitive_of(task))
    parameters = list(inspect.signature(task.run).parameters) if task is not None else []
    return DeadLetter(
        task_name=str(headers.get("task") or "<unknown>"),
        task_id=str(headers.get("id") or ""),
        failure_class=str(FailureClass.POISON),
        reason=rt.masker.text(reason),
        args=masked_args,
        kwargs=masked_kwargs,
        correlation_id=producer.get("correlation_id"),
        tenant_id=producer.get("tenant_id"),
        exception_type=type(error).__name__ if error else None,
        exception_message=rt.masker.text(str(error)) if error else None,
        headers=rt.masker.data(producer),
        routing={"exchange": info.get("exchange"), "routing_key": info.get("routing_key")},
        raw_body=raw,
        masked_args=changed_arguments(parameters, args, kwargs, masked_args, masked_kwargs),
    )


def dead_letter_message(message: Any, reason: str, error: BaseException | None,
                        task: Any = None) -> bool:
    """Write the DLQ entry; False (and the message requeued) if the store is away."""
    rt = get_runtime()
    entry = envelope_for(message, reason, error, task)
    try:
        rt.wait_for_store("dead_letter", lambda: rt.dlq.add(entry, rt.ledger),
                          seconds=CONSUMER_STORE_WAIT_SECONDS)
    except BackendUnavailable as exc:
        log.error("message_requeued_store_unavailable", task_id=entry.task_id, error=str(exc))
        message.reject(requeue=True)
        return False
    metrics.DEAD_LETTERS.labels(entry.task_name, entry.failure_class).inc()
    log.error("message_dead_lettered", task_id=entry.task_id, task_name=entry.task_name,
              failure_class=entry.failure_class, reason=entry.reason, dlq_id=entry.id)
    return True


# Delivery tags of messages this process holds unacked but will never ack (the broker
# connection they came on is gone); restored to the queue after reconnecting.
_orphaned_tags: list[str] = []


def hand_back(tag: Any) -> None:
    """Restore this message after the next reconnect (its own delivery can never ack)."""
    if tag:
        _orphaned_tags.append(str(tag))


class ReliableConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, dead-lettering every message it would drop, before the ack.

    It also hands back messages Celery forgets when the broker connection drops: the
    reserved (prefetched) requests that never started, and running ones Celery
    cancelled (see ``ReliableRequest.cancel``). Their messages stay unacked in Redis,
    where Celery would leave them for the visibility timeout (an hour); after
    reconnecting they are restored by delivery tag.
    """

    def on_close(self) -> None:
        from celery.worker.state import active_requests, reserved_requests

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

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        name = (message.headers or {}).get("task")
        if dead_letter_message(message, f"unknown task {name!r}: not registered", exc):
            super().on_unknown_task(body, message, exc)

    def _task_of(self, message: Any) -> Any:
        name = (message.headers or {}).get("task")
        return self.app.tasks.get(name) if isinstance(name, str) else None

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        reason = f"invalid task message ({message.content_type}): {exc}"
        if dead_letter_message(message, reason, exc, self._task_of(message)):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        reason = f"undecodable body ({message.content_type}): {exc}"
        if dead_letter_message(message, reason, exc, self._task_of(message)):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if dead_letter_message(message, "message of unknown format (no task header)", None):
            super().on_unknown_message(body, message)
