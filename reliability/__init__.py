"""The reliability pipeline for Celery tasks: idempotency, retries, deferral, DLQ.

Imports nothing from ``worker/`` or ``tasks/``; the worker builds these objects from
settings.
"""

from reliability.delivery import current, outgoing_headers
from reliability.errors import (
    BackendUnavailable,
    ConfigurationError,
    DeadlineExceeded,
    IdempotencyConflict,
    PermanentError,
    PoisonMessage,
    ReliabilityError,
    StaleFencingToken,
    TransientError,
)
from reliability.idempotency import IdempotencyStore, SideEffectWrapper, idempotent
from reliability.retry import RetryPolicy
from reliability.task import ReliableTask

__all__ = [
    "BackendUnavailable",
    "ConfigurationError",
    "DeadlineExceeded",
    "IdempotencyConflict",
    "IdempotencyStore",
    "PermanentError",
    "PoisonMessage",
    "ReliabilityError",
    "ReliableTask",
    "RetryPolicy",
    "SideEffectWrapper",
    "StaleFencingToken",
    "TransientError",
    "current",
    "idempotent",
    "outgoing_headers",
]
