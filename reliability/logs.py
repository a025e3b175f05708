"""Structured logs: structlog JSON for our lines and Celery's, secrets removed last.

Enrichment is a chain of structlog processors. Task context (task id, name, attempt,
correlation id, tenant) is bound with ``bind_contextvars`` by the pipeline, so every
line a task writes carries it. Celery's own records go through ``ProcessorFormatter``
and the same chain, so everything on stderr is one JSON object per line. The masker
runs after exceptions are rendered, so a secret inside a traceback is removed too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from celery.worker.consumer import consumer as celery_consumer
from structlog.typing import EventDict, WrappedLogger

from reliability.security import Masker

if TYPE_CHECKING:
    from reliability.delivery import Delivery

# Bound to every log line while a delivery runs (until Celery's task_postrun).
TASK_CONTEXT_KEYS = ("task_id", "task_name", "attempt", "correlation_id", "tenant_id")


def bind_task_context(d: Delivery) -> None:
    """Bind a delivery's ids to every log line until :func:`clear_task_context`, so
    Celery's own lines about it (succeeded, retry, raised) carry them too."""
    clear_task_context()
    context = {
        "task_id": d.task_id,
        "task_name": d.name,
        "attempt": d.attempt,
        "correlation_id": d.correlation_id,
    }
    if d.tenant_id:
        context["tenant_id"] = d.tenant_id
    structlog.contextvars.bind_contextvars(**context)


def clear_task_context() -> None:
    """Unbind the log context a delivery bound (called on Celery's ``task_postrun``)."""
    structlog.contextvars.unbind_contextvars(*TASK_CONTEXT_KEYS)


# What replaces the message body and headers Celery's consumer prints when it drops a
# message (they hold the arguments, and the producer's argsrepr/kwargsrepr, in clear).
BODY_NOT_LOGGED = "[message body not logged]"
# Longest first line kept of such a log line.
DUMP_LINE_CHARS = 300


def _first_line(event: str) -> str:
    return event.split("\n", 1)[0][:DUMP_LINE_CHARS]


def _decode_error(event_dict: EventDict) -> str:
    """The line of an undecodable body, from the exception Celery logs with it: its first
    line formats the exception with ``%r``, and a ``UnicodeDecodeError``'s repr holds the
    whole body."""
    info = event_dict.get("exc_info")
    exc = info[1] if isinstance(info, tuple) and len(info) == 3 else info
    if isinstance(exc, BaseException):
        return f"Can't decode message body: {type(exc).__name__}: {exc}"[:DUMP_LINE_CHARS]
    return "Can't decode message body."


# Celery's templates that dump a dropped message -> its first sentence, from the rendered
# line (``structlog`` has already formatted and dropped the record's args).
# The templates are module constants the stubs leave out.
_consumer: Any = celery_consumer
_DUMPS: dict[str, Callable[[str, EventDict], str]] = {
    _consumer.UNKNOWN_TASK_ERROR: lambda event, _ed: _first_line(event),
    _consumer.INVALID_TASK_ERROR: lambda event, _ed: _first_line(event),
    _consumer.UNKNOWN_FORMAT: lambda event, _ed: _first_line(event).rstrip(),
    _consumer.MESSAGE_DECODE_ERROR: lambda _event, ed: _decode_error(ed),
}


def drop_color_message(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """uvicorn passes its message again with terminal colour codes (``color_message``) as
    an extra: noise in a structured line."""
    event_dict.pop("color_message", None)
    return event_dict


def cut_message_dumps(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Celery's consumer logs the whole body and headers of a message it drops (unknown
    task, invalid message, undecodable body, unknown format): a ``password`` argument or
    a task's ``sensitive_args`` value in clear. Keep the first sentence and replace the
    dump with :data:`BODY_NOT_LOGGED`; the DLQ entry keeps the message, masked. An
    invalid message's line carries no traceback."""
    record = event_dict.get("_record")
    template = getattr(record, "msg", None)
    if isinstance(template, str):
        first = _DUMPS.get(template)
        event = event_dict.get("event")
        if first is not None and isinstance(event, str):
            event_dict["event"] = f"{first(event, event_dict)} {BODY_NOT_LOGGED}"
        if template == _consumer.INVALID_TASK_ERROR:
            # The message is wrong, not the code: its reason is the line; a traceback
            # through Celery's consumer says nothing more.
            event_dict.pop("exc_info", None)
            event_dict.pop("exception", None)
    return event_dict


def drop_quiet_tracebacks(_logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Celery attaches a traceback to every task log record, even a deliberate ``Ignore``
    (each deferral) logged at INFO: keep tracebacks for warnings and errors only."""
    data = event_dict.get("data")
    if isinstance(data, dict) and "traceback" in data and method in ("debug", "info"):
        event_dict["data"] = {k: v for k, v in data.items() if k != "traceback"}
    return event_dict


def configure_logging(
    level: str = "INFO", json_output: bool = True, masker: Masker | None = None
) -> None:
    """Route structlog and stdlib logging through one JSON (or console) renderer."""
    masker = masker or Masker()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), drop_color_message],
        processors=[
            cut_message_dumps,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            drop_quiet_tracebacks,
            structlog.processors.format_exc_info,
            masker.processor,
            renderer,
            masker.rendered,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # Celery's per-task INFO lines stay; its chatty internals do not.
    for noisy in ("kombu", "amqp", "redis", "celery.bootsteps", "celery.utils.functional"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
