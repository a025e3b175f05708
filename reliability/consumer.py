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
import json
from collections.abc import Callable
from typing import Any

import structlog
from celery.worker.consumer import Consumer
from vine import promise

from reliability import metrics, transport
from reliability.deadletter import envelope, short
from reliability.delivery import PRODUCER_HEADERS
from reliability.dlq import DeadLetter, FailureClass
from reliability.errors import PoisonMessage
from reliability.poison import Poison, check_size, raw_excerpt, usable_task_id
from reliability.reprs import sensitive_of
from reliability.runtime import Runtime, runtime_of

log = structlog.get_logger("reliability.consumer")

# The consumer loop must not stall long on an unreachable store: wait this, then requeue.
CONSUMER_STORE_WAIT_SECONDS = 2.0


def _decoded_json(message: Any) -> Any:
    if message.content_type != "application/json":
        return None
    try:
        return json.loads(message.body)
    except (TypeError, ValueError, UnicodeDecodeError, RecursionError):
        return None


def _body_bytes(message: Any) -> bytes:
    body = message.body
    if isinstance(body, bytes):
        return body
    return str(body).encode("utf-8", "surrogateescape")


def envelope_for(rt: Runtime, message: Any, reason: str, error: BaseException | None, *,
                 decode: bool = True, task: Any = None) -> DeadLetter:
    """A DLQ envelope for a message that never reached a task (``decode=False``: the body
    is kept raw, e.g. for a message too large to decode; ``task``: the registered task of
    that name, if any, whose sensitive arguments are masked whole).

    A body kept raw is masked by pattern and configured secret only: the values of the
    task's ``sensitive_args`` cannot be located in bytes that do not decode, so for a task
    that declares any, no raw byte is kept (its size is)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    body = _decoded_json(message) if decode else None
    spec = getattr(task, "spec", None)
    sensitive = sensitive_of(spec)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    raw = raw_size = None
    if (isinstance(body, list) and len(body) >= 2 and isinstance(body[0], list | tuple | None)
            and isinstance(body[1], dict | None)):
        args, kwargs = list(body[0] or []), dict(body[1] or {})
    else:
        raw_bytes = _body_bytes(message)
        raw_size = len(raw_bytes)
        raw = None if sensitive else raw_excerpt(raw_bytes, rt.masker.raw)
    producer = {k: headers[k] for k in PRODUCER_HEADERS if headers.get(k) is not None}
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    return envelope(
        rt.masker, task_name=str(headers.get("task") or "<unknown>"),
        task_id=str(headers.get("id") or ""), failure_class=str(FailureClass.POISON),
        reason=reason, error=error, args=args, kwargs=kwargs, sensitive=sensitive,
        parameters=list(spec.signature.parameters) if spec is not None else [],
        headers=producer, correlation_id=short(producer.get("correlation_id")),
        tenant_id=short(producer.get("tenant_id")),
        routing={"exchange": info.get("exchange"), "routing_key": info.get("routing_key")},
        raw_body=raw, raw_size=raw_size)


def _write(rt: Runtime, entry: DeadLetter, hand_back: Callable[[Any], object]) -> bool:
    """Write a DLQ entry, waiting briefly for the store; False (handed back) if it stays
    away."""
    written = rt.stored("dead_letter", lambda: rt.dlq.add(entry, rt.ledger) + 1,
                        wait=CONSUMER_STORE_WAIT_SECONDS, hand_back=hand_back)
    if written is None:
        return False
    metrics.DEAD_LETTERS.labels(entry.task_name, entry.failure_class).inc()
    log.error("message_dead_lettered", task_id=entry.task_id, task_name=entry.task_name,
              failure_class=entry.failure_class, reason=entry.reason, dlq_id=entry.id)
    return True


# Set on a kombu message once its DLQ entry is written, so nothing writes a second one.
DEAD_LETTERED = "_reliable_dead_lettered"


def dead_letter_message(rt: Runtime, message: Any, reason: str, error: BaseException | None, *,
                        decode: bool = True, task: Any = None, backend: Any = None) -> bool:
    """Write the DLQ entry; False (and the message requeued) if the store is away.

    ``backend``: Celery's result backend, to store a FAILURE result for the message's
    task id once the entry is written (a producer's ``AsyncResult.get()`` then raises
    instead of waiting for its timeout)."""
    if getattr(message, DEAD_LETTERED, False):
        return True

    def requeue(_exc: Any) -> None:
        if not message.acknowledged:
            message.reject(requeue=True)

    entry = envelope_for(rt, message, reason, error, decode=decode, task=task)
    if not _write(rt, entry, requeue):
        return False
    setattr(message, DEAD_LETTERED, True)
    if backend is not None:
        store_poison_result(backend, message, entry.reason)
    return True


def store_poison_result(backend: Any, message: Any, reason: str) -> None:
    """A FAILURE result (:class:`PoisonMessage` with the entry's masked reason) for a
    dead-lettered message that names a usable task id and wants its result; a backend
    error is logged and ignored (the DLQ entry is the record that counts)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id = headers.get("id")
    if not usable_task_id(task_id) or headers.get("ignore_result") is True:
        return
    try:
        backend.mark_as_failure(task_id, PoisonMessage(reason), call_errbacks=False)
    except Exception as exc:
        log.warning("poison_result_not_stored", task_id=task_id,
                    error=f"{type(exc).__name__}: {exc}"[:300])


def dead_letter_raw(rt: Runtime, item: bytes, queue: str, poison: Poison) -> bool:
    """The transport's poison sink: a raw queue item that is no message at all."""
    entry = envelope(
        rt.masker, task_name="<unknown>", task_id="", failure_class=str(FailureClass.POISON),
        reason=f"{poison.kind}: {poison.reason}", routing={"exchange": "", "routing_key": queue},
        raw_body=raw_excerpt(item, rt.masker.raw), raw_size=len(item))
    entry.exception_type, entry.exception_message = type(poison).__name__, poison.kind
    return _write(rt, entry, lambda _exc: None)


def _running_tags() -> set[str]:
    from celery.worker.state import active_requests

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
                check_size(len(_body_bytes(message)), max_bytes)
            except Poison as poison:
                reason = f"{poison.kind}: {poison.reason}"
                if dead_letter_message(self.runtime, message, reason, poison, decode=False,
                                       backend=self.app.backend):
                    message.ack()
                return None
            try:
                return handle(message)
            except connection_errors:
                raise
            except Exception as exc:
                # Celery's own code failed on this message (possibly after acking it):
                # record it if nothing did yet, settle it, and keep consuming.
                log.error("task_message_handler_failed", error=f"{type(exc).__name__}: {exc}",
                          exc_info=True)
                reason = f"malformed task message: {type(exc).__name__}: {exc}"[:500]
                task = self._task_of(message)
                if (dead_letter_message(self.runtime, message, reason, exc, task=task,
                                        backend=self.app.backend)
                        and not message.acknowledged):
                    message.ack()
                return None

        return on_task_received

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

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        reason = f"unknown task {name!r}: not registered"
        if dead_letter_message(self.runtime, message, reason, exc):
            super().on_unknown_task(body, message, exc)

    def _task_of(self, message: Any) -> Any:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = headers.get("task")
        return self.app.tasks.get(name) if isinstance(name, str) else None

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        reason = f"invalid task message ({message.content_type}): {exc}"
        if dead_letter_message(self.runtime, message, reason, exc, task=self._task_of(message),
                               backend=self.app.backend):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = f"undecodable body ({message.content_type}): {exc}"
        if dead_letter_message(self.runtime, message, reason, exc, task=self._task_of(message),
                               backend=self.app.backend):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        reason = "message of unknown format (no task header)"
        if dead_letter_message(self.runtime, message, reason, None, backend=self.app.backend):
            super().on_unknown_message(body, message)
