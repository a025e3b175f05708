"""The seeds' API shapes as thin entry points over the library (issue 6, item 13).

``check_idempotency`` / ``clear_idempotency`` must find the very key the task pipeline or
an ``@idempotent`` function uses: the task tests run a real ``ReliableTask`` through its
pipeline in-process (``task.apply``) against real Redis and count body runs. Also
``generate_idempotency_key`` (seed 002), ``get_circuit_breaker`` and ``failure_count``
(seeds 003, 000), ``EffectType`` with the ``wrap_*`` helpers (seed 004), the duplicate
marker and the ``idempotency_lock_acquired`` event (seed 000).
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from celery import Celery, current_app

import reliability
from reliability import runtime as runtime_module
from reliability.breaker import SERVICE_DEFAULTS, BreakerConfig, CircuitState
from reliability.effects import (
    EffectType,
    SideEffectWrapper,
    entity_id,
    wrap_effect,
    wrap_order_placement,
)
from reliability.errors import ConfigurationError, TransientError
from reliability.idempotency_keys import (
    check_idempotency,
    clear_idempotency,
    generate_idempotency_key,
    locate,
)
from reliability.idempotency_store import IdempotencyStore
from reliability.idempotent import idempotent
from reliability.runtime import Runtime, set_runtime
from reliability.store import Store
from reliability.task import ReliableTask
from tests.support.fleet import wait_until

SEED_004_TYPES = {
    "ORDER_PLACEMENT",
    "POSITION_UPDATE",
    "PNL_WRITE",
    "LEDGER_WRITE",
    "TRADE_STATE_WRITE",
}
RUNS: Counter[str] = Counter()  # body runs of the tasks below, by task name

app = Celery("seed-api-tests", set_as_current=False)


@app.task(
    base=ReliableTask,
    name="seedapi.charge",
    idempotency_key_args=("payment_id",),
    dependency="gateway",
)
def charge(payment_id: str, amount: int, currency: str = "EUR") -> dict[str, Any]:
    RUNS["seedapi.charge"] += 1
    return {"charged": payment_id, "amount": amount}


@app.task(base=ReliableTask, name="seedapi.notify", idempotent=True)
def notify(user_id: str, text: str) -> str:
    RUNS["seedapi.notify"] += 1
    return f"sent to {user_id}"


@app.task(base=ReliableTask, name="seedapi.unkeyed")
def unkeyed(value: int) -> int:
    return value


@pytest.fixture
def runtime(bare_store: Store) -> Iterator[Runtime]:
    """The store as the worker runtime, and this file's Celery app as the current app."""
    previous_runtime = runtime_module._runtime
    previous_app = current_app._get_current_object()
    installed = Runtime(bare_store)
    set_runtime(installed)
    app.set_current()
    RUNS.clear()
    yield installed
    previous_app.set_current()
    runtime_module._runtime = previous_runtime
    if installed._cache is not None:
        installed._cache.close()


# -- check_idempotency / clear_idempotency on tasks ----------------------------------------


def test_check_and_clear_find_the_key_the_pipeline_wrote_for_key_args(runtime: Runtime) -> None:
    assert check_idempotency("seedapi.charge", "p1", 500) is False
    assert charge.apply(args=("p1", 500)).get() == {"charged": "p1", "amount": 500}
    assert charge.apply(kwargs={"payment_id": "p1", "amount": 500}).get()["charged"] == "p1"
    assert RUNS["seedapi.charge"] == 1  # the second delivery was an idempotent skip
    ids, redis_key = locate("seedapi.charge", ("p1", 500), {})
    assert redis_key.startswith(f"{runtime.store.keys.prefix}:{{gateway}}:idem:")  # task.tag
    assert ids.state(redis_key)["state"] == "done"
    assert check_idempotency("seedapi.charge", "p1", 500) is True
    assert check_idempotency("seedapi.charge", payment_id="p1", amount=500) is True
    assert check_idempotency("seedapi.charge", "p2", 500) is False
    assert clear_idempotency("seedapi.charge", "p1", 500) is True
    assert clear_idempotency("seedapi.charge", "p1", 500) is False
    assert check_idempotency("seedapi.charge", "p1", 500) is False
    charge.apply(args=("p1", 500)).get()
    assert RUNS["seedapi.charge"] == 2  # cleared: the next delivery ran the body again


def test_check_and_clear_find_the_hashed_key_of_an_idempotent_task(runtime: Runtime) -> None:
    notify.apply(args=("u1", "hello")).get()
    assert check_idempotency("seedapi.notify", "u1", "hello") is True
    assert check_idempotency("seedapi.notify", "u1", text="hello") is True
    assert check_idempotency("seedapi.notify", "u1", "other text") is False
    assert clear_idempotency("seedapi.notify", user_id="u1", text="hello") is True
    notify.apply(args=("u1", "hello")).get()
    notify.apply(args=("u1", "hello")).get()
    assert RUNS["seedapi.notify"] == 2


def test_a_running_task_counts_as_taken(runtime: Runtime) -> None:
    ids, redis_key = locate("seedapi.charge", ("p9", 1), {})
    decision, lease = ids.acquire(redis_key, "fp", lease_seconds=30)
    assert decision == "run"
    assert check_idempotency("seedapi.charge", "p9", 1) is True
    ids.release(lease)
    assert check_idempotency("seedapi.charge", "p9", 1) is False  # released: would run


def test_bad_names_and_arguments_get_clear_errors(runtime: Runtime) -> None:
    with pytest.raises(LookupError, match="no reliable task or @idempotent function"):
        check_idempotency("seedapi.missing", 1)
    with pytest.raises(ValueError, match="not keyed by its arguments"):
        check_idempotency("seedapi.unkeyed", 1)
    with pytest.raises(TypeError, match=r"arguments do not fit seedapi\.charge"):
        check_idempotency("seedapi.charge", "p1")  # amount missing
    with pytest.raises(TypeError, match="unexpected keyword"):
        clear_idempotency("seedapi.charge", "p1", 5, colour="red")
    assert list(runtime.store.client.scan_iter(match=f"{runtime.store.keys.prefix}:*")) == []


# -- check_idempotency / clear_idempotency on @idempotent functions ------------------------


def test_check_and_clear_find_an_idempotent_function_by_its_name(bare_store: Store) -> None:
    runs: list[int] = []

    @idempotent(ttl=3600, store=bare_store)
    async def seed_process_payment(payment_id: int, amount: float) -> dict[str, Any]:
        runs.append(payment_id)
        assert check_idempotency("seed_process_payment", payment_id, amount)  # running
        return {"status": "success", "payment_id": payment_id}

    qualified = f"{__name__}.{seed_process_payment.__qualname__}"
    assert check_idempotency("seed_process_payment", 123, 50.0) is False
    asyncio.run(seed_process_payment(123, 50.0))
    assert check_idempotency("seed_process_payment", 123, 50.0) is True
    assert check_idempotency(qualified, payment_id=123, amount=50.0) is True
    assert check_idempotency("seed_process_payment", 124, 50.0) is False
    assert clear_idempotency("seed_process_payment", 123, 50.0) is True
    assert check_idempotency("seed_process_payment", 123, 50.0) is False
    asyncio.run(seed_process_payment(123, 50.0))
    asyncio.run(seed_process_payment(123, 50.0))
    assert runs == [123, 123]


def test_two_functions_sharing_a_short_name_are_found_by_their_full_names(
    bare_store: Store,
) -> None:
    def make(tag: str) -> Any:
        @idempotent(store=bare_store, name=f"{__name__}.shared_{tag}")
        def shared(value: int) -> str:
            return f"{tag}{value}"

        return shared

    first, second = make("a"), make("b")

    @idempotent(store=bare_store)
    def seed_twin(value: int) -> int:
        return value

    twin_one = seed_twin

    @idempotent(store=bare_store)
    def seed_twin(value: int) -> int:  # redefined: same qualified name, same key namespace
        return -value

    # The first definition was replaced under the same qualified name: one namespace.
    assert twin_one(1) == 1 and seed_twin(1) == 1
    assert check_idempotency("seed_twin", 1) is True
    assert first(1) == "a1" and second(1) == "b1"
    assert check_idempotency(f"{__name__}.shared_a", 1) is True
    assert check_idempotency(f"{__name__}.shared_b", 2) is False

    def elsewhere() -> Any:
        @idempotent(store=bare_store)
        def seed_twin(value: int) -> int:
            return value

        return seed_twin

    elsewhere()
    with pytest.raises(LookupError, match="several @idempotent functions"):
        check_idempotency("seed_twin", 1)
    assert check_idempotency(f"{__name__}.{seed_twin.__qualname__}", 1) is True


def test_key_args_must_name_parameters(bare_store: Store) -> None:
    with pytest.raises(ConfigurationError, match=r"key_args \['order'\] are not parameters"):

        @idempotent(store=bare_store, key_args=("order",))
        def place(order_id: str) -> str:
            return order_id


# -- the duplicate marker and the events (seed 000) ----------------------------------------


def test_the_duplicate_marker_is_opt_in(bare_store: Store) -> None:
    @idempotent(ttl=3600, store=bare_store, mark_duplicates=True, name="seed.marked")
    async def marked(payment_id: int) -> dict[str, Any]:
        return {"status": "success", "payment_id": payment_id}

    @idempotent(ttl=3600, store=bare_store, name="seed.plain")
    async def plain(payment_id: int) -> dict[str, Any]:
        return {"status": "success", "payment_id": payment_id}

    assert asyncio.run(marked(123)) == {"status": "success", "payment_id": 123}
    assert asyncio.run(marked(123)) == {"skipped": True, "reason": "idempotent_duplicate"}
    asyncio.run(plain(123))
    assert asyncio.run(plain(123)) == {"status": "success", "payment_id": 123}


def test_store_paths_log_acquired_skipped_and_released(bare_store: Store) -> None:
    attempts: list[int] = []

    @idempotent(store=bare_store, name="seed.logged")
    def flaky(value: int) -> int:
        attempts.append(value)
        if len(attempts) == 1:
            raise ConnectionError("down")
        return value

    with structlog.testing.capture_logs() as logs:
        with pytest.raises(ConnectionError):
            flaky(7)
        flaky(7)
        flaky(7)
    events = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith(("idem", "task"))]
    assert events == [
        ("idempotency_lock_acquired", "info"),
        ("idempotency_lock_released_on_error", "info"),
        ("idempotency_lock_acquired", "info"),
        ("task_skipped_idempotent", "info"),
    ]
    assert [e["fence"] for e in logs if e["event"] == "idempotency_lock_acquired"] == [1, 2]


def test_a_keyed_task_logs_the_lock_at_debug_level(runtime: Runtime) -> None:
    with structlog.testing.capture_logs() as logs:
        charge.apply(args=("p5", 5)).get()
        charge.apply(args=("p5", 5)).get()
        unkeyed.apply(args=(1,)).get()
    acquired = [e for e in logs if e["event"] == "idempotency_lock_acquired"]
    assert [(e["log_level"], e["fence"]) for e in acquired] == [("debug", 1)]
    assert sum(e["event"] == "task_skipped_idempotent" for e in logs) == 1


# -- generate_idempotency_key (seed 002) ---------------------------------------------------


class Currency(enum.Enum):
    EUR = "EUR"


def test_generated_keys_are_deterministic_hex() -> None:
    key = generate_idempotency_key("create_payment", 42, 100, "EUR")
    # Pinned: producers store these keys, so the encoding must never change silently.
    assert key == "21429298b3bdad2959ed4a744b948d3c7f4f378f26264373a47738d1c756cc47"
    assert generate_idempotency_key(user=1, amount=2) == generate_idempotency_key(amount=2, user=1)
    assert generate_idempotency_key("op", 1) != generate_idempotency_key("op", "1")
    assert generate_idempotency_key("op", 1) != generate_idempotency_key("op", 1, None)
    stable = (
        "op",
        datetime.date(2025, 1, 2),
        decimal.Decimal("9.99"),
        uuid.UUID(int=7),
        Currency.EUR,
        {"b": [1, 2], "a": None},
    )
    assert generate_idempotency_key(*stable) == generate_idempotency_key(*stable)
    assert generate_idempotency_key(*stable) == generate_idempotency_key(
        "op", "2025-01-02", "9.99", str(uuid.UUID(int=7)), "EUR", {"a": None, "b": [1, 2]}
    )


def test_generated_keys_refuse_values_without_a_stable_text() -> None:
    with pytest.raises(TypeError, match="cannot key on a object"):
        generate_idempotency_key("op", object())
    with pytest.raises(ValueError, match="non-finite"):
        generate_idempotency_key("op", float("nan"))
    with pytest.raises(ValueError, match="at least one part"):
        generate_idempotency_key()


# -- get_circuit_breaker and failure_count (seeds 003, 000) --------------------------------


def test_get_circuit_breaker_serves_the_runtime_registry(runtime: Runtime) -> None:
    assert reliability.get_circuit_breaker("payment") is runtime.breakers.get("payment")
    config = BreakerConfig(failure_threshold=2, recovery_timeout=60.0)
    cb = reliability.get_circuit_breaker("my_service", config)
    assert cb is runtime.breakers.get("my_service")
    assert reliability.get_circuit_breaker("my_service") is cb
    assert reliability.get_circuit_breaker("my_service", config) is cb
    with pytest.raises(ConfigurationError, match="'my_service' is already defined"):
        reliability.get_circuit_breaker("my_service", BreakerConfig(failure_threshold=9))
    with pytest.raises(KeyError, match="no circuit breaker named 'nowhere'"):
        reliability.get_circuit_breaker("nowhere")


def test_get_circuit_breaker_over_a_given_store(bare_store: Store) -> None:
    config = BreakerConfig(failure_threshold=2)
    cb = reliability.get_circuit_breaker("my_service", config, store=bare_store)
    assert (cb.name, cb.store, cb.config) == ("my_service", bare_store, config)
    defaults = reliability.get_circuit_breaker("payment", store=bare_store)
    assert defaults.config == SERVICE_DEFAULTS["payment"]
    with pytest.raises(KeyError, match="pass a BreakerConfig"):
        reliability.get_circuit_breaker("nowhere", store=bare_store)


def test_seed_003_usage_and_failure_count(bare_store: Store) -> None:
    cb = reliability.get_circuit_breaker(
        "my_service", BreakerConfig(failure_threshold=3, recovery_timeout=60), store=bare_store
    )

    async def my_function() -> str:
        return "success"

    async def failing() -> str:
        raise TransientError("503")

    async def scenario() -> list[int]:
        counts = [cb.failure_count]
        assert await cb.call(my_function) == "success"
        for _ in range(2):
            with pytest.raises(TransientError):
                await cb.call(failing)
        counts.append(cb.failure_count)
        await cb.call(my_function)  # a success ends the run of consecutive failures
        counts.append(cb.failure_count)
        for _ in range(3):
            with pytest.raises(TransientError):
                await cb.call(failing)
        counts.append(cb.failure_count)
        return counts

    assert asyncio.run(scenario()) == [0, 2, 0, 3]
    assert cb.state is CircuitState.OPEN
    cb.reset()
    assert (cb.failure_count, cb.state) == (0, CircuitState.CLOSED)


def test_failure_count_through_the_runtime_cache(runtime: Runtime) -> None:
    cb = reliability.get_circuit_breaker("payment")
    assert cb.cache is not None
    assert cb.failure_count == 0
    for _ in range(2):
        with pytest.raises(TransientError):
            cb.call(lambda: (_ for _ in ()).throw(TransientError("503")))
    wait_until(lambda: cb.failure_count == 2, 5, message="the cache to see 2 failures")


# -- EffectType and wrap_* (seed 004) ------------------------------------------------------


def test_effect_types_include_seed_004s() -> None:
    assert {t.value for t in EffectType} >= SEED_004_TYPES
    assert {"PAYMENT_CHARGE", "NOTIFICATION_SEND", "WEBHOOK_DELIVERY", "EXPORT_GENERATION"} <= set(
        EffectType
    )
    for effect in EffectType:
        helper = getattr(reliability, f"wrap_{effect.value.lower()}")
        assert helper.__name__ == f"wrap_{effect.value.lower()}"


def test_wrap_order_placement_runs_once_per_entity(bare_store: Store) -> None:
    placed: list[int] = []

    def place_order() -> dict[str, str]:
        placed.append(1)
        return {"order_id": "12345", "status": "filled"}

    entity = {"symbol": "BTCUSDT", "side": "buy", "quantity": 0.01, "price": 50000.0}
    assert wrap_order_placement(bare_store, place_order, **entity) == (
        True,
        {"order_id": "12345", "status": "filled"},
    )
    reordered = dict(reversed(list(entity.items())))
    assert wrap_order_placement(bare_store, place_order, **reordered) == (
        False,
        {"order_id": "12345", "status": "filled"},
    )
    assert placed == [1]
    key = f"{bare_store.keys.prefix}:effect:ORDER_PLACEMENT:{entity_id(**entity)}"
    assert entity_id(**entity) == generate_idempotency_key(**entity)
    assert bare_store.client.hget(key, "state") == "done"
    assert wrap_order_placement(bare_store, place_order, **{**entity, "price": 50001.0})[0]
    assert placed == [1, 1]


@pytest.mark.parametrize("effect", list(EffectType))
def test_each_helper_keys_by_its_own_type(bare_store: Store, effect: EffectType) -> None:
    helper = getattr(reliability, f"wrap_{effect.value.lower()}")
    assert helper(bare_store, lambda: "done", entity="e1", ttl_seconds=900) == (True, "done")
    key = f"{bare_store.keys.prefix}:effect:{effect.value}:{entity_id(entity='e1')}"
    assert 0 < bare_store.client.ttl(key) <= 900
    assert IdempotencyStore(bare_store).status(key) == "done"


def test_wrap_helpers_await_async_effects_and_refuse_bad_input(bare_store: Store) -> None:
    sent: list[str] = []

    async def deliver() -> int:
        sent.append("hook")
        return 204

    for expected in ((True, 204), (False, 204)):
        pending = wrap_effect(bare_store, EffectType.WEBHOOK_DELIVERY, deliver, hook_id="h1")
        assert asyncio.run(pending) == expected
    assert sent == ["hook"]
    with pytest.raises(ValueError, match="at least one entity field"):
        wrap_order_placement(bare_store, lambda: None)
    with pytest.raises(TypeError, match="cannot key on a object"):
        wrap_order_placement(bare_store, lambda: None, order=object())
    with pytest.raises(ValueError, match="non-empty effect type and entity id"):
        SideEffectWrapper(bare_store).run("", "e1", deliver)
    assert sent == ["hook"]
