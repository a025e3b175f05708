"""The reliability pipeline for Celery tasks: idempotency, retries, deferral, DLQ.

Imports nothing from ``worker/`` or ``tasks/``; the worker builds these objects from
settings.
"""

from reliability.breaker import (
    BreakerConfig,
    BreakerMode,
    CircuitBreaker,
    CircuitBreakerError,
    CircuitState,
)
from reliability.callables import AwaitableReturned
from reliability.delivery import current, outgoing_headers
from reliability.effects import (
    EffectType,
    SideEffectWrapper,
    wrap_effect,
    wrap_export_generation,
    wrap_ledger_write,
    wrap_notification_send,
    wrap_order_placement,
    wrap_payment_charge,
    wrap_pnl_write,
    wrap_position_update,
    wrap_trade_state_write,
    wrap_webhook_delivery,
)
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
from reliability.idempotency_keys import (
    check_idempotency,
    clear_idempotency,
    generate_idempotency_key,
)
from reliability.idempotency_store import DUPLICATE_MARKER, IdempotencyStore, InProgress
from reliability.idempotent import idempotent
from reliability.retry import RetryPolicy
from reliability.runtime import get_circuit_breaker
from reliability.task import ReliableTask

__all__ = [
    "DUPLICATE_MARKER",
    "AwaitableReturned",
    "BackendUnavailable",
    "BreakerConfig",
    "BreakerMode",
    "CircuitBreaker",
    "CircuitBreakerError",
    "CircuitState",
    "ConfigurationError",
    "DeadlineExceeded",
    "EffectType",
    "IdempotencyConflict",
    "IdempotencyStore",
    "InProgress",
    "PermanentError",
    "PoisonMessage",
    "ReliabilityError",
    "ReliableTask",
    "RetryPolicy",
    "SideEffectWrapper",
    "StaleFencingToken",
    "TransientError",
    "check_idempotency",
    "clear_idempotency",
    "current",
    "generate_idempotency_key",
    "get_circuit_breaker",
    "idempotent",
    "outgoing_headers",
    "wrap_effect",
    "wrap_export_generation",
    "wrap_ledger_write",
    "wrap_notification_send",
    "wrap_order_placement",
    "wrap_payment_charge",
    "wrap_pnl_write",
    "wrap_position_update",
    "wrap_trade_state_write",
    "wrap_webhook_delivery",
]
