"""Building a dead letter: the one place a DLQ envelope is made.

Every DLQ entry — a task that failed for good, a poison message the consumer never
handed to a task, an expired or revoked delivery — is built by :func:`envelope`, so
every one is masked the same way: configured secrets and patterns everywhere, the task's
``sensitive_args`` whole (and their values wherever else they appear: the exception
message, the traceback), header values cut to a readable length. The DLQ's
``DEAD_LETTER`` script (:mod:`reliability.dlq`) stores it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from reliability.dlq import DeadLetter, FailureClass
from reliability.errors import DeadlineExceeded, IdempotencyConflict, PoisonMessage
from reliability.security import Masker
from reliability.sensitive import NO_SENSITIVE_ARGS, SensitiveArgs, changed_arguments

if TYPE_CHECKING:
    from reliability.guard import Call

# Header values longer than this are cut in an envelope (hostile producers send anything).
HEADER_CHARS = 200


def short(value: Any, limit: int = HEADER_CHARS) -> str | None:
    """A header value as text for an envelope, cut to ``limit`` characters."""
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def envelope(
    masker: Masker,
    *,
    task_name: str,
    task_id: str,
    failure_class: str,
    reason: str = "",
    error: BaseException | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    sensitive: SensitiveArgs = NO_SENSITIVE_ARGS,
    parameters: Sequence[str] = (),
    headers: Mapping[str, Any] | None = None,
    **fields: Any,
) -> DeadLetter:
    """A DLQ envelope with every field masked (see the module docstring).

    ``parameters``: the task's parameter names (to list which arguments were masked);
    ``fields``: the envelope's other fields as they are (ids, attempts, routing, ...).
    """
    kwargs = dict(kwargs or {})
    masker = masker.including(sensitive.values(args, kwargs))
    shown_args, shown_kwargs = masker.call(args, kwargs, sensitive)
    text = reason or (str(error) if error else "")
    now = time.time()
    fields.setdefault("first_failure_at", now)
    fields.setdefault("last_failure_at", now)
    return DeadLetter(
        task_name=short(task_name) or "<unknown>",
        task_id=short(task_id) or "",
        failure_class=failure_class,
        reason=masker.text(text[:2000]),
        args=shown_args,
        kwargs=shown_kwargs,
        exception_type=type(error).__name__ if error else None,
        exception_message=masker.text(str(error)[:2000]) if error else None,
        traceback=masker.text("".join(traceback.format_exception(error))) if error else None,
        headers=masker.data({k: short(v) for k, v in (headers or {}).items()}),
        masked_args=changed_arguments(
            list(parameters), list(args), kwargs, shown_args, shown_kwargs
        ),
        **fields,
    )


def classify(exc: BaseException, retryable: bool) -> FailureClass:
    if isinstance(exc, IdempotencyConflict):
        return FailureClass.CONFLICT
    if isinstance(exc, PoisonMessage):
        return FailureClass.POISON
    if isinstance(exc, DeadlineExceeded):
        return FailureClass.EXPIRED
    return FailureClass.TRANSIENT if retryable else FailureClass.PERMANENT


def for_call(
    call: Call, failure: FailureClass, *, exc: BaseException | None = None, reason: str = ""
) -> DeadLetter:
    """The envelope of a delivery the pipeline dead-letters: its call, ids and routing."""
    d = call.d
    return envelope(
        call.rt.masker,
        task_name=d.name,
        task_id=d.task_id,
        failure_class=str(failure),
        reason=reason,
        error=exc,
        args=d.args,
        kwargs=d.kwargs,
        sensitive=call.spec.sensitive,
        parameters=list(call.spec.signature.parameters),
        headers=d.producer_headers(),
        idempotency_key=d.idempotency_key,
        correlation_id=d.correlation_id,
        tenant_id=d.tenant_id,
        attempts=d.attempt,
        first_failure_at=d.first_attempt_at or time.time(),
        redrive_count=d.redrive_count,
        routing=d.routing,
        expires=d.expires,
        time_limits=list(d.time_limits) if d.time_limits else None,
        parent_id=d.parent_id,
        root_id=d.root_id,
    )
