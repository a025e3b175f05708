"""The seeds' API shapes, each run once against a real Redis, printing what every call did.

    python examples/resilience_usage.py

Circuit breaker (``get_circuit_breaker``, ``await cb.call(fn)``, ``async with cb.guard()``,
``failure_count``), ``@idempotent`` on an ``async def`` (stored result, duplicate marker),
``check_idempotency`` / ``clear_idempotency`` for a function and for a task run through
its pipeline, ``generate_idempotency_key``, ``wrap_order_placement`` and the effect types,
``RetryPolicy`` on a coroutine function. Log lines (``idempotency_lock_acquired`` ...) go to
stderr. Uses ``REDIS_URL`` if set, else an embedded Redis it starts and stops; everything
it writes is under a fresh key prefix, deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery

from reliability import (
    AwaitableReturned,
    BreakerConfig,
    CircuitBreakerError,
    EffectType,
    ReliableTask,
    RetryPolicy,
    SideEffectWrapper,
    TransientError,
    check_idempotency,
    clear_idempotency,
    generate_idempotency_key,
    get_circuit_breaker,
    idempotent,
    wrap_order_placement,
)
from reliability.logs import configure_logging
from reliability.runtime import Runtime, set_runtime
from reliability.store import Store

app = Celery("resilience-usage")  # tasks run in-process here (task.apply), no broker needed
runs: dict[str, int] = {"process_payment": 0, "send_receipt": 0, "charge": 0, "flaky": 0}


@contextmanager
def redis_url() -> Iterator[str]:
    """``REDIS_URL`` if set, else an embedded Redis started for this run and stopped after.

    The one place that touches ``worker.embedded``, whose start/stop API may change.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from worker import embedded

    data_dir = tempfile.mkdtemp(prefix="resilience-usage-")
    url = embedded.ensure_embedded_redis(data_dir)
    print(f"started an embedded Redis at {url}")
    try:
        yield url
    finally:
        embedded.stop_embedded_redis(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        print("stopped the embedded Redis")


# -- circuit breaker (seeds 000, 003) ------------------------------------------------------


async def my_function() -> str:
    return "success"


async def payment_api_charge(user_id: int, amount: float) -> dict[str, Any]:
    raise TransientError("payment API answered 503")


async def breakers(store: Store) -> None:
    config = BreakerConfig(failure_threshold=3, recovery_timeout=60.0)
    cb = get_circuit_breaker("payment_api", config, store=store)
    result = await cb.call(my_function)
    print(f"breaker: result = await cb.call(my_function) -> {result!r}")
    for attempt in range(1, 4):
        try:
            await cb.call(payment_api_charge, user_id=123, amount=50.0)
        except TransientError as exc:
            print(f"breaker: async failure {attempt} -> {exc}; failure_count={cb.failure_count}")
    print(f"breaker: after 3 async failures state={cb.state}, failure_count={cb.failure_count}")
    try:
        async with cb.guard():
            await payment_api_charge(user_id=123, amount=50.0)
    except CircuitBreakerError as exc:
        print(f"breaker: 4th call refused without calling the API ({exc.reason})")
    cb.reset()
    print(f"breaker: after reset state={cb.state}, failure_count={cb.failure_count}")
    try:
        cb.call(lambda: my_function())  # a plain lambda hiding a coroutine
    except AwaitableReturned:
        print(
            "breaker: a plain function returning a coroutine is refused (AwaitableReturned),"
            f" not counted: failure_count={cb.failure_count}"
        )


# -- @idempotent, check / clear (seed 000) ---------------------------------------------------


@idempotent(ttl=3600)  # the runtime's store
async def process_payment(payment_id: int, amount: float) -> dict[str, Any]:
    runs["process_payment"] += 1
    await asyncio.sleep(0)
    return {"status": "success", "payment_id": payment_id}


@idempotent(ttl=3600, mark_duplicates=True)
async def send_receipt(payment_id: int) -> dict[str, Any]:
    runs["send_receipt"] += 1
    return {"receipt": payment_id}


async def idempotency() -> None:
    first = await process_payment(123, 50.0)
    second = await process_payment(123, 50.0)
    print(f"idempotent: first call -> {first}")
    print(f"idempotent: second call -> {second} (stored result)")
    print(f"idempotent: process_payment body ran {runs['process_payment']} time(s)")
    await send_receipt(123)
    print(f"idempotent: duplicate with mark_duplicates -> {await send_receipt(123)}")
    for call in ("check", "clear", "check"):
        fn = check_idempotency if call == "check" else clear_idempotency
        print(
            f"idempotent: {call}_idempotency('process_payment', 123, 50.0) ->"
            f" {fn('process_payment', 123, 50.0)}"
        )
    await process_payment(123, 50.0)
    print(f"idempotent: after clearing, the body ran again ({runs['process_payment']} runs)")


@app.task(base=ReliableTask, name="example.charge", idempotency_key_args=("payment_id",))
def charge(payment_id: str, amount: int) -> dict[str, Any]:
    runs["charge"] += 1
    return {"charged": payment_id, "amount": amount}


def tasks() -> None:
    print(
        f"task: check_idempotency('example.charge', 'pay-1', 500) ->"
        f" {check_idempotency('example.charge', 'pay-1', 500)}"
    )
    for _ in range(2):
        charge.apply(args=("pay-1", 500)).get()  # the task's own pipeline, in-process
    print(f"task: example.charge delivered twice, body ran {runs['charge']} time(s)")
    print(
        f"task: check_idempotency('example.charge', 'pay-1', 500) ->"
        f" {check_idempotency('example.charge', 'pay-1', 500)}"
    )


# -- keys and side effects (seeds 002, 004) ------------------------------------------------


def effects(store: Store) -> None:
    key = generate_idempotency_key("create_payment", 42, 100, "EUR")
    print(f"key: generate_idempotency_key('create_payment', 42, 100, 'EUR') -> {key}")

    def place_order() -> dict[str, str]:
        return {"order_id": "12345", "status": "filled"}

    for _ in range(2):
        executed, result = wrap_order_placement(
            store, place_order, symbol="BTCUSDT", side="buy", quantity=0.01, price=50000.0
        )
        print(f"effect: wrap_order_placement -> executed={executed}, result={result}")
    print(f"effect: types {', '.join(t.value for t in EffectType)}")


async def async_effect(store: Store) -> None:
    async def charge_card(amount: int) -> dict[str, Any]:
        return {"charged": amount}

    wrapper = SideEffectWrapper(store)
    for _ in range(2):
        executed, result = await wrapper.run(EffectType.PAYMENT_CHARGE, "pay-7", charge_card, 900)
        print(f"effect: async PAYMENT_CHARGE -> executed={executed}, result={result}")


# -- retry policy on a coroutine function (seed 003) ----------------------------------------


@RetryPolicy(strategy="fixed", base_delay=0.01, max_attempts=3, jitter="none")
async def flaky() -> str:
    runs["flaky"] += 1
    if runs["flaky"] < 3:
        raise TransientError("timeout")
    return "ok"


async def retries() -> None:
    result = await flaky()
    print(f"retry: async flaky() -> {result!r} after attempts={runs['flaky']}")


def main() -> int:
    configure_logging(level="INFO", json_output=False)
    with redis_url() as url:
        store = Store(url, f"example-{uuid.uuid4().hex[:8]}")
        print(f"key prefix {store.keys.prefix}")
        set_runtime(Runtime(store))
        try:
            asyncio.run(breakers(store))
            asyncio.run(idempotency())
            effects(store)
            asyncio.run(async_effect(store))
            asyncio.run(retries())
            tasks()
        finally:
            written = list(store.client.scan_iter(match=f"{store.keys.prefix}:*"))
            if written:
                store.client.delete(*written)
            print(f"deleted {len(written)} keys under {store.keys.prefix}")
            store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
