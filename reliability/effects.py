"""Exactly-once side effects (seed 004): :class:`SideEffectWrapper`, effect types, ``wrap_*``.

``executed, result = wrap_order_placement(store, place_order, symbol="BTCUSDT",
side="buy", quantity=0.01)`` runs ``place_order()`` at most once for that entity: the
entity's fields give a deterministic id (:func:`generate_idempotency_key`, so keyword
order does not matter), the key is ``P:effect:ORDER_PLACEMENT:<id>`` (72 hours by
default), and a repeat returns ``(False, stored result)``. An ``async def`` function gets
an awaitable of that pair.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from reliability.callables import is_async_callable, refuse_awaitable
from reliability.idempotency import fingerprint
from reliability.idempotency_keys import generate_idempotency_key
from reliability.idempotency_store import DEFAULT_EFFECT_TTL_SECONDS, IdempotencyStore, Lease
from reliability.security import key_token
from reliability.store import Store

R = TypeVar("R")


class SideEffectWrapper:
    """Exactly-once side effects keyed ``effect:{type}:{entity_id}`` (seed 004).

    Seed 004's effect types and ``wrap_*`` helpers are below.
    """

    def __init__(self, store: Store, ttl_seconds: int = DEFAULT_EFFECT_TTL_SECONDS) -> None:
        self.ids = IdempotencyStore(store)
        self.ttl_seconds = ttl_seconds

    def key(self, effect_type: str, entity_id: str) -> str:
        # seed 004's effect:{type}:{entity_id}; an unsafe id is hashed (never raw input in
        # a key name).
        return (
            f"{self.ids.store.keys.prefix}:effect:{key_token(str(effect_type))}:"
            f"{key_token(entity_id)}"
        )

    def run(
        self,
        effect_type: str,
        entity_id: str,
        fn: Callable[..., Any],
        *args: Any,
        ttl_seconds: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """``(executed, result)``: False with the cached result when already done.

        For a coroutine function, an awaitable of that pair (``fn`` is awaited before its
        result is stored).
        """
        effect_type, entity_id = str(effect_type), str(entity_id)
        if not effect_type or not entity_id:
            raise ValueError("a side effect needs a non-empty effect type and entity id")
        key = self.key(effect_type, entity_id)
        fp = fingerprint({"args": list(args), "kwargs": kwargs})
        ttl = ttl_seconds or self.ttl_seconds
        if is_async_callable(fn):

            async def body(_lease: Lease) -> Any:
                return await fn(*args, **kwargs)

            return self.ids.run_once(key, fp, body, ttl_seconds=ttl)

        def call(_lease: Lease) -> Any:
            result = fn(*args, **kwargs)
            refuse_awaitable(result, fn, "SideEffectWrapper.run")
            return result

        return self.ids.run_once(key, fp, call, ttl_seconds=ttl)


class EffectType(StrEnum):
    """Kinds of side effect; the value is the ``{type}`` in ``effect:{type}:{entity_id}``."""

    # Seed 004's trading effects.
    ORDER_PLACEMENT = "ORDER_PLACEMENT"
    POSITION_UPDATE = "POSITION_UPDATE"
    PNL_WRITE = "PNL_WRITE"
    LEDGER_WRITE = "LEDGER_WRITE"
    TRADE_STATE_WRITE = "TRADE_STATE_WRITE"
    # This service's business effects (payments, notifications, webhooks, exports).
    PAYMENT_CHARGE = "PAYMENT_CHARGE"
    NOTIFICATION_SEND = "NOTIFICATION_SEND"
    WEBHOOK_DELIVERY = "WEBHOOK_DELIVERY"
    EXPORT_GENERATION = "EXPORT_GENERATION"


def entity_id(**entity: Any) -> str:
    """The deterministic id of an entity given by its fields (64 hex digits)."""
    if not entity:
        raise ValueError("an effect needs at least one entity field, e.g. order_id=...")
    return generate_idempotency_key(**entity)


def wrap_effect(
    store: Store,
    effect_type: EffectType | str,
    fn: Callable[[], Any],
    /,
    *,
    ttl_seconds: int | None = None,
    **entity: Any,
) -> Any:
    """Run ``fn()`` at most once per (effect type, entity): ``(executed, result)``.

    ``entity`` fields name the entity (see :func:`entity_id`); ``ttl_seconds`` overrides
    the 72-hour default. For a coroutine function, an awaitable of the pair.
    """
    wrapper = SideEffectWrapper(store)
    return wrapper.run(str(effect_type), entity_id(**entity), fn, ttl_seconds=ttl_seconds)


class EffectHelper(Protocol):
    """The shape of the ``wrap_*`` helpers: ``(store, fn, **entity) -> (executed, result)``."""

    def __call__(
        self,
        store: Store,
        fn: Callable[[], Any],
        /,
        *,
        ttl_seconds: int | None = None,
        **entity: Any,
    ) -> Any: ...


def _helper(effect_type: EffectType) -> EffectHelper:
    def wrap(
        store: Store, fn: Callable[[], Any], /, *, ttl_seconds: int | None = None, **entity: Any
    ) -> Any:
        return wrap_effect(store, effect_type, fn, ttl_seconds=ttl_seconds, **entity)

    wrap.__name__ = wrap.__qualname__ = f"wrap_{effect_type.value.lower()}"
    wrap.__doc__ = (
        f"Run ``fn()`` at most once per entity as a {effect_type.value} effect:"
        " ``(executed, result)`` (see :func:`wrap_effect`)."
    )
    return wrap


wrap_order_placement = _helper(EffectType.ORDER_PLACEMENT)
wrap_position_update = _helper(EffectType.POSITION_UPDATE)
wrap_pnl_write = _helper(EffectType.PNL_WRITE)
wrap_ledger_write = _helper(EffectType.LEDGER_WRITE)
wrap_trade_state_write = _helper(EffectType.TRADE_STATE_WRITE)
wrap_payment_charge = _helper(EffectType.PAYMENT_CHARGE)
wrap_notification_send = _helper(EffectType.NOTIFICATION_SEND)
wrap_webhook_delivery = _helper(EffectType.WEBHOOK_DELIVERY)
wrap_export_generation = _helper(EffectType.EXPORT_GENERATION)
