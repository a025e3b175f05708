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
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

from reliability.security import Masker


def drop_quiet_tracebacks(_logger: WrappedLogger, method: str, event_dict: EventDict
                          ) -> EventDict:
    """Celery attaches a traceback to every task log record, even a deliberate ``Ignore``
    (each deferral) logged at INFO: keep tracebacks for warnings and errors only."""
    data = event_dict.get("data")
    if isinstance(data, dict) and "traceback" in data and method in ("debug", "info"):
        event_dict["data"] = {k: v for k, v in data.items() if k != "traceback"}
    return event_dict


def configure_logging(level: str = "INFO", json_output: bool = True,
                      masker: Masker | None = None) -> None:
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
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
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
