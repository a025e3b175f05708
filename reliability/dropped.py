"""Dead-lettering what the consumer would drop: messages that never reach a task.

An unknown task name, a body that cannot be decoded, a message of no known format, a raw
queue item the transport finds unreadable, an oversized message: Celery would log and
discard each. Here each one is written to the DLQ as ``poison`` — masked, the raw body
kept base64-encoded and never deserialised — before Celery drops it; when the store
cannot be reached the message is requeued instead, so nothing is acked unwritten. A
poison message with a usable task id also gets a ``FAILURE`` result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog

from reliability import metrics
from reliability.deadletter import envelope, short
from reliability.delivery import PRODUCER_HEADERS
from reliability.dlq import DeadLetter, FailureClass
from reliability.errors import PoisonMessage
from reliability.poison import Poison, raw_excerpt, usable_task_id
from reliability.reprs import sensitive_of
from reliability.runtime import Runtime

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


def body_bytes(message: Any) -> bytes:
    body = message.body
    if isinstance(body, bytes):
        return body
    return str(body).encode("utf-8", "surrogateescape")


def envelope_for(
    rt: Runtime,
    message: Any,
    reason: str,
    error: BaseException | None,
    *,
    decode: bool = True,
    task: Any = None,
) -> DeadLetter:
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
    if (
        isinstance(body, list)
        and len(body) >= 2
        and isinstance(body[0], list | tuple | None)
        and isinstance(body[1], dict | None)
    ):
        args, kwargs = list(body[0] or []), dict(body[1] or {})
    else:
        raw_bytes = body_bytes(message)
        raw_size = len(raw_bytes)
        raw = None if sensitive else raw_excerpt(raw_bytes, rt.masker.raw)
    producer = {k: headers[k] for k in PRODUCER_HEADERS if headers.get(k) is not None}
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    return envelope(
        rt.masker,
        task_name=str(headers.get("task") or "<unknown>"),
        task_id=str(headers.get("id") or ""),
        failure_class=str(FailureClass.POISON),
        reason=reason,
        error=error,
        args=args,
        kwargs=kwargs,
        sensitive=sensitive,
        parameters=list(spec.signature.parameters) if spec is not None else [],
        headers=producer,
        correlation_id=short(producer.get("correlation_id")),
        tenant_id=short(producer.get("tenant_id")),
        routing={"exchange": info.get("exchange"), "routing_key": info.get("routing_key")},
        raw_body=raw,
        raw_size=raw_size,
    )


def _write(rt: Runtime, entry: DeadLetter, hand_back: Callable[[Any], object]) -> bool:
    """Write a DLQ entry, waiting briefly for the store; False (handed back) if it stays
    away."""
    written = rt.stored(
        "dead_letter",
        lambda: rt.dlq.add(entry, rt.ledger) + 1,
        wait=CONSUMER_STORE_WAIT_SECONDS,
        hand_back=hand_back,
    )
    if written is None:
        return False
    metrics.DEAD_LETTERS.labels(entry.task_name, entry.failure_class).inc()
    log.error(
        "message_dead_lettered",
        task_id=entry.task_id,
        task_name=entry.task_name,
        failure_class=entry.failure_class,
        reason=entry.reason,
        dlq_id=entry.id,
    )
    return True


# Set on a kombu message once its DLQ entry is written, so nothing writes a second one.
DEAD_LETTERED = "_reliable_dead_lettered"


def dead_letter_message(
    rt: Runtime,
    message: Any,
    reason: str,
    error: BaseException | None,
    *,
    decode: bool = True,
    task: Any = None,
    backend: Any = None,
) -> bool:
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
        log.warning(
            "poison_result_not_stored", task_id=task_id, error=f"{type(exc).__name__}: {exc}"[:300]
        )


def dead_letter_raw(rt: Runtime, item: bytes, queue: str, poison: Poison) -> bool:
    """The transport's poison sink: a raw queue item that is no message at all."""
    entry = envelope(
        rt.masker,
        task_name="<unknown>",
        task_id="",
        failure_class=str(FailureClass.POISON),
        reason=f"{poison.kind}: {poison.reason}",
        routing={"exchange": "", "routing_key": queue},
        raw_body=raw_excerpt(item, rt.masker.raw),
        raw_size=len(item),
    )
    entry.exception_type, entry.exception_message = type(poison).__name__, poison.kind
    return _write(rt, entry, lambda _exc: None)
