"""Sync and async callables behave alike wherever the library accepts one (issue 6, item 12).

Breaker (``call``, ``call_async``, ``guard``, decorator), ``@idempotent``,
``IdempotencyStore.run_once``, ``SideEffectWrapper.run`` and ``RetryPolicy`` as decorator,
each against real Redis (the retry policy is pure logic). Every test counts the calls that
reached the function and the state Redis holds afterwards. A plain callable that returns
an awaitable is refused with ``AwaitableReturned``, recorded as nothing and never warned
about as "never awaited".
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from reliability.breaker import BreakerConfig, CircuitBreaker, CircuitBreakerError, CircuitState
from reliability.callables import AwaitableReturned, is_async_callable
from reliability.effects import SideEffectWrapper
from reliability.errors import TransientError
from reliability.idempotency import canonical
from reliability.idempotency_store import DUPLICATE_MARKER, IdempotencyStore, InProgress, Lease
from reliability.idempotent import idempotent
from reliability.retry import RetryPolicy
from reliability.store import Store
from tests.support.fleet import wait_until

THRESHOLD = 3
NO_WAIT = RetryPolicy(strategy="fixed", base_delay=0.0, max_attempts=3, jitter="none")


class Downstream:
    """A dependency reached sync or async; counts the calls that got through."""

    def __init__(self, failures: int = 0) -> None:
        self.calls = 0
        self.failures = failures  # the first N calls fail

    def sync(self, value: int = 1) -> dict[str, int]:
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientError("503")
        return {"value": value * 2}

    async def coro(self, value: int = 1) -> dict[str, int]:
        await asyncio.sleep(0)
        return self.sync(value)


class AsyncCallable:
    """An object whose ``__call__`` is ``async def``: async, though not a function."""

    def __init__(self, downstream: Downstream) -> None:
        self.downstream = downstream

    async def __call__(self, value: int = 1) -> dict[str, int]:
        return await self.downstream.coro(value)


@contextmanager
def no_unawaited_coroutines() -> Iterator[None]:
    """Fail if a coroutine was created and dropped without being awaited or closed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    dropped = [w for w in caught if "never awaited" in str(w.message)]
    assert dropped == [], [str(w.message) for w in dropped]


@pytest.fixture
def breaker(bare_store: Store) -> CircuitBreaker:
    return CircuitBreaker(
        "dependency", bare_store, BreakerConfig(failure_threshold=THRESHOLD, recovery_timeout=30)
    )


def assert_open_after_three(breaker: CircuitBreaker, downstream: Downstream) -> None:
    assert downstream.calls == THRESHOLD
    assert breaker.state is CircuitState.OPEN
    assert breaker.failure_count == THRESHOLD


# -- what counts as async ------------------------------------------------------------------


def test_async_callables_are_told_apart_before_the_call() -> None:
    downstream = Downstream()
    assert is_async_callable(downstream.coro)
    assert is_async_callable(functools.partial(downstream.coro, 2))
    assert is_async_callable(AsyncCallable(downstream))
    assert not is_async_callable(downstream.sync)
    assert not is_async_callable(lambda: downstream.coro())
    assert not is_async_callable(AsyncCallable)  # the class: calling it makes an instance
    assert downstream.calls == 0


# -- circuit breaker -----------------------------------------------------------------------


def test_three_async_failures_open_the_breaker_and_the_fourth_is_refused_uncalled(
    breaker: CircuitBreaker,
) -> None:
    downstream = Downstream(failures=10)

    async def scenario() -> None:
        for _ in range(THRESHOLD):
            with pytest.raises(TransientError):
                await breaker.call(downstream.coro)
        with pytest.raises(CircuitBreakerError):
            await breaker.call(downstream.coro)

    asyncio.run(scenario())
    assert_open_after_three(breaker, downstream)


def test_call_with_a_coroutine_function_returns_an_awaitable_that_admits_when_awaited(
    breaker: CircuitBreaker,
) -> None:
    downstream = Downstream()
    pending = breaker.call(downstream.coro, 21)
    assert inspect.isawaitable(pending)
    assert downstream.calls == 0  # nothing ran, nothing was admitted yet
    assert asyncio.run(pending) == {"value": 42}  # type: ignore[arg-type]
    assert downstream.calls == 1
    assert breaker.failure_count == 0
    assert breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize("kind", ["partial", "async __call__", "call_async", "decorator"])
def test_every_async_form_counts_its_failures(breaker: CircuitBreaker, kind: str) -> None:
    downstream = Downstream(failures=10)
    decorated = breaker(downstream.coro)
    attempt = {
        "partial": lambda: breaker.call(functools.partial(downstream.coro, 1)),
        "async __call__": lambda: breaker.call(AsyncCallable(downstream)),
        "call_async": lambda: breaker.call_async(downstream.coro),
        "decorator": lambda: decorated(),
    }[kind]

    async def scenario() -> None:
        for _ in range(THRESHOLD):
            with pytest.raises(TransientError):
                await attempt()
        with pytest.raises(CircuitBreakerError):
            await attempt()

    asyncio.run(scenario())
    assert_open_after_three(breaker, downstream)


def test_async_with_guard_records_each_awaited_block(breaker: CircuitBreaker) -> None:
    downstream = Downstream(failures=10)

    async def scenario() -> None:
        for _ in range(THRESHOLD):
            with pytest.raises(TransientError):
                async with breaker.guard():
                    await downstream.coro()
        with pytest.raises(CircuitBreakerError):
            async with breaker.guard():
                await downstream.coro()

    asyncio.run(scenario())
    assert_open_after_three(breaker, downstream)


def test_call_async_takes_a_plain_function_and_counts_its_failures(breaker: CircuitBreaker) -> None:
    downstream = Downstream(failures=THRESHOLD)

    async def scenario() -> None:
        for _ in range(THRESHOLD):
            with pytest.raises(TransientError):
                await breaker.call_async(downstream.sync)  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert_open_after_three(breaker, downstream)


@pytest.mark.parametrize("kind", ["call", "decorator"])
def test_a_plain_function_returning_a_coroutine_is_refused_and_never_counted(
    breaker: CircuitBreaker, kind: str
) -> None:
    downstream = Downstream(failures=10)

    def hidden_async() -> Any:
        return downstream.coro()

    attempt = (
        breaker(hidden_async)
        if kind == "decorator"
        else functools.partial(breaker.call, hidden_async)
    )
    with no_unawaited_coroutines():
        for _ in range(THRESHOLD + 2):
            with pytest.raises(AwaitableReturned, match="hidden_async is not a coroutine"):
                attempt()
    assert downstream.calls == 0  # the coroutine was closed, never run
    assert breaker.failure_count == 0
    assert breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_call_duration_includes_the_await(bare_store: Store, kind: str) -> None:
    """Two calls slower than slow_call_seconds open a slow-call-rate breaker: only if the
    breaker timed the awaited call, not the creation of its coroutine."""
    config = BreakerConfig(
        failure_threshold=0,
        slow_call_seconds=0.05,
        slow_call_rate_threshold=1.0,
        minimum_requests=2,
    )
    breaker = CircuitBreaker("slow", bare_store, config)

    def slow_sync() -> str:
        time.sleep(0.08)
        return "ok"

    async def slow_async() -> str:
        await asyncio.sleep(0.08)
        return "ok"

    for _ in range(2):
        if kind == "sync":
            assert breaker.call(slow_sync) == "ok"
        else:
            assert asyncio.run(breaker.call(slow_async)) == "ok"  # type: ignore[arg-type]
    assert breaker.state is CircuitState.OPEN
    assert breaker.failure_count == 0  # opened on slow calls, not failures


def test_an_awaited_half_open_trial_holds_its_slot_until_it_ends(bare_store: Store) -> None:
    config = BreakerConfig(
        failure_threshold=1, recovery_timeout=0.2, half_open_max_calls=1, success_threshold=1
    )
    breaker = CircuitBreaker("trial", bare_store, config)
    downstream = Downstream(failures=1)
    with pytest.raises(TransientError):
        asyncio.run(breaker.call(downstream.coro))  # type: ignore[arg-type]
    wait_until(lambda: breaker.state is CircuitState.HALF_OPEN, 5, message="half-open")

    async def scenario() -> tuple[Any, str]:
        gate = asyncio.Event()

        async def trial() -> str:
            await gate.wait()
            return await downstream.coro()  # type: ignore[return-value]

        running = asyncio.ensure_future(breaker.call(trial))
        await asyncio.sleep(0)  # the trial is admitted and now awaits the gate
        try:
            await breaker.call(downstream.coro)
            refused = "admitted"
        except CircuitBreakerError as exc:
            refused = exc.reason
        gate.set()
        return await running, refused

    result, refused = asyncio.run(scenario())
    assert refused == "busy"  # the only trial slot was held across the await
    assert result == {"value": 2}
    assert downstream.calls == 2  # the failure that opened it, then the one trial
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failure_count == 0


# -- @idempotent ---------------------------------------------------------------------------


def test_async_idempotent_runs_once_and_returns_the_stored_result_not_a_repr(
    bare_store: Store,
) -> None:
    runs: list[int] = []

    @idempotent(ttl=600, store=bare_store)
    async def process_payment(payment_id: int, amount: float) -> dict[str, Any]:
        await asyncio.sleep(0)
        runs.append(payment_id)
        return {"status": "success", "payment_id": payment_id, "amount": amount}

    assert inspect.iscoroutinefunction(process_payment)
    first = asyncio.run(process_payment(123, 50.0))
    second = asyncio.run(process_payment(123, amount=50.0))
    assert first == second == {"status": "success", "payment_id": 123, "amount": 50.0}
    assert isinstance(second, dict)
    assert runs == [123]
    [key] = bare_store.client.scan_iter(match=f"{bare_store.keys.prefix}:{{fn}}:idem:*")
    assert bare_store.client.hget(key, "result") == canonical(first)
    assert "coroutine" not in bare_store.client.hget(key, "result")


def test_an_async_failure_releases_the_key_so_the_next_call_runs(bare_store: Store) -> None:
    attempts: list[int] = []

    @idempotent(store=bare_store)
    async def charge(payment_id: str) -> str:
        attempts.append(len(attempts) + 1)
        await asyncio.sleep(0)
        if len(attempts) == 1:
            raise ConnectionError("provider down")
        return f"charged {payment_id}"

    with pytest.raises(ConnectionError):
        asyncio.run(charge("p1"))
    [key] = bare_store.client.scan_iter(match=f"{bare_store.keys.prefix}:{{fn}}:idem:*")
    assert bare_store.client.hget(key, "state") == "released"
    assert asyncio.run(charge("p1")) == "charged p1"
    assert asyncio.run(charge("p1")) == "charged p1"
    assert attempts == [1, 2]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_mark_duplicates_returns_the_skip_marker_on_repeats(bare_store: Store, kind: str) -> None:
    runs: list[str] = []

    if kind == "sync":

        @idempotent(store=bare_store, mark_duplicates=True, name=f"marked-{kind}")
        def send(user: str) -> dict[str, str]:
            runs.append(user)
            return {"sent": user}

        call = send
    else:

        @idempotent(store=bare_store, mark_duplicates=True, name=f"marked-{kind}")
        async def send_async(user: str) -> dict[str, str]:
            runs.append(user)
            return {"sent": user}

        def call(user: str) -> Any:
            return asyncio.run(send_async(user))

    assert call("u1") == {"sent": "u1"}
    repeat = call("u1")
    assert repeat == {"skipped": True, "reason": "idempotent_duplicate"} == DUPLICATE_MARKER
    repeat["mutated"] = True  # a copy: the next caller still gets the plain marker
    assert call("u1") == DUPLICATE_MARKER
    assert runs == ["u1"]


def test_idempotent_refuses_a_plain_function_returning_a_coroutine(bare_store: Store) -> None:
    downstream = Downstream()

    @idempotent(store=bare_store)
    def hidden_async(value: int) -> Any:
        return downstream.coro(value)

    with no_unawaited_coroutines():
        for _ in range(2):  # nothing was stored: the second call is refused the same way
            with pytest.raises(AwaitableReturned, match=r"@idempotent: .*hidden_async"):
                hidden_async(1)
    assert downstream.calls == 0
    [key] = bare_store.client.scan_iter(match=f"{bare_store.keys.prefix}:{{fn}}:idem:*")
    state = bare_store.client.hgetall(key)
    assert state["state"] == "released" and "result" not in state


def test_concurrent_async_calls_of_one_key_run_the_body_once(bare_store: Store) -> None:
    racers = 5
    runs: list[int] = []

    @idempotent(store=bare_store)
    async def export(report: str) -> str:
        runs.append(1)
        await losers_done.wait()  # hold the lease until every other caller was turned away
        return f"{report}.csv"

    losers_done: asyncio.Event

    async def scenario() -> list[Any]:
        nonlocal losers_done
        losers_done = asyncio.Event()
        refused = 0

        async def loser() -> Any:
            nonlocal refused
            try:
                return await export("daily")
            finally:
                refused += 1
                if refused == racers - 1:
                    losers_done.set()

        winner = asyncio.ensure_future(export("daily"))
        await asyncio.sleep(0)  # the winner takes the lease and awaits
        losers = await asyncio.gather(*(loser() for _ in range(racers - 1)), return_exceptions=True)
        return [await winner, *losers]

    outcomes = asyncio.run(scenario())
    assert outcomes[0] == "daily.csv"
    assert [type(o) for o in outcomes[1:]] == [InProgress] * (racers - 1)
    assert runs == [1]
    assert asyncio.run(export("daily")) == "daily.csv"  # now done: the stored result
    assert runs == [1]


# -- IdempotencyStore.run_once and SideEffectWrapper.run ----------------------------------


def test_run_once_awaits_a_coroutine_function_and_stores_its_result(bare_store: Store) -> None:
    ids = IdempotencyStore(bare_store)
    key = ids.redis_key("order-9")
    leases: list[Lease] = []

    async def place(lease: Lease) -> dict[str, int]:
        leases.append(lease)
        await asyncio.sleep(0)
        return {"order": 9, "fence": lease.fence}

    first = ids.run_once(key, "fp", place, ttl_seconds=600)
    assert inspect.isawaitable(first)
    assert asyncio.run(first) == (True, {"order": 9, "fence": 1})  # type: ignore[arg-type]
    again = ids.run_once(key, "fp", place, ttl_seconds=600)
    assert inspect.isawaitable(again)  # a done key answers through the await too
    assert asyncio.run(again) == (False, {"order": 9, "fence": 1})  # type: ignore[arg-type]
    assert len(leases) == 1
    assert ids.state(key)["result"] == canonical({"order": 9, "fence": 1})


def test_run_once_refuses_a_plain_function_returning_a_coroutine(bare_store: Store) -> None:
    ids = IdempotencyStore(bare_store)
    key = ids.redis_key("order-10")
    downstream = Downstream()
    with no_unawaited_coroutines(), pytest.raises(AwaitableReturned):
        ids.run_once(key, "fp", lambda _lease: downstream.coro())
    assert downstream.calls == 0
    assert ids.status(key) == "free"
    assert ids.state(key)["state"] == "released"


def test_side_effect_wrapper_awaits_async_effects_once(bare_store: Store) -> None:
    effects = SideEffectWrapper(bare_store, ttl_seconds=900)
    downstream = Downstream()
    first = asyncio.run(effects.run("PAYMENT_CHARGE", "pay-1", downstream.coro, 5))
    second = asyncio.run(effects.run("PAYMENT_CHARGE", "pay-1", downstream.coro, 5))
    assert (first, second) == ((True, {"value": 10}), (False, {"value": 10}))
    assert downstream.calls == 1
    key = effects.key("PAYMENT_CHARGE", "pay-1")
    assert json.loads(bare_store.client.hget(key, "result")) == {"value": 10}
    with no_unawaited_coroutines(), pytest.raises(AwaitableReturned):
        effects.run("PAYMENT_CHARGE", "pay-2", lambda: downstream.coro())
    assert downstream.calls == 1


# -- RetryPolicy as decorator (pure logic: no Redis) ---------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async", "partial"])
def test_the_retry_decorator_retries_sync_and_async_alike(kind: str) -> None:
    downstream = Downstream(failures=2)
    fn = {
        "sync": downstream.sync,
        "async": downstream.coro,
        "partial": functools.partial(downstream.coro, 1),
    }[kind]
    retried = NO_WAIT(fn)
    result = retried() if kind == "sync" else asyncio.run(retried())
    assert result == {"value": 2}
    assert downstream.calls == 3


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_retry_decorator_gives_up_after_max_attempts(kind: str) -> None:
    downstream = Downstream(failures=10)
    retried = NO_WAIT(downstream.sync if kind == "sync" else downstream.coro)
    with pytest.raises(TransientError):
        retried() if kind == "sync" else asyncio.run(retried())
    assert downstream.calls == NO_WAIT.max_attempts


def test_the_retry_decorator_refuses_a_plain_function_returning_a_coroutine_at_once() -> None:
    downstream = Downstream(failures=10)
    made: list[int] = []

    def hidden_async() -> Any:
        made.append(1)
        return downstream.coro()

    with no_unawaited_coroutines(), pytest.raises(AwaitableReturned):
        NO_WAIT(hidden_async)()
    assert made == [1]  # not retried: a programming error, not a transient failure
    assert downstream.calls == 0
    assert not NO_WAIT.is_retryable(AwaitableReturned("x"))
