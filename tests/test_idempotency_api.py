"""Idempotency for plain code (store, decorator, side-effect wrapper), masking, deadlines.

Real Redis for everything that keeps state; the security and deadline helpers are pure.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reliability.deadline import (
    format_deadline,
    parse_deadline,
    remaining_seconds,
    soft_limit,
    validate_deadline,
)
from reliability.effects import SideEffectWrapper
from reliability.errors import IdempotencyConflict
from reliability.idempotency import derive_key, fingerprint
from reliability.idempotency_store import IdempotencyStore, InProgress
from reliability.idempotent import idempotent
from reliability.security import MASK, Masker, mask_secret
from reliability.store import Store

NOW = 1_000_000.0
RACERS = 8


# -- IdempotencyStore --------------------------------------------------------------------


def test_check_reads_the_state_without_taking_a_lease(bare_store: Store) -> None:
    ids = IdempotencyStore(bare_store)
    key = ids.redis_key("order-1")
    assert key == f"{bare_store.keys.prefix}:{{fn}}:idem:order-1"
    assert ids.state(key) == {}
    assert not ids.is_done(key)
    assert bare_store.client.exists(key) == 0
    _, lease = ids.acquire(key, "fp", lease_seconds=5, now=NOW)
    state = ids.state(key)
    assert (state["state"], state["owner"], state["fence"]) == ("running", lease.owner, "1")
    assert not ids.is_done(key)
    assert ids.complete(lease, {"total": 3}, 3600, now=NOW + 1)
    assert ids.is_done(key)
    assert ids.state(key)["result"] == '{"total":3}'


def test_clear_forgets_a_key_so_the_next_call_runs_again(bare_store: Store) -> None:
    ids = IdempotencyStore(bare_store)
    key = ids.redis_key("order-1")
    _, lease = ids.acquire(key, "fp", now=NOW)
    ids.complete(lease, "ok", 3600, now=NOW)
    assert ids.acquire(key, "fp", now=NOW + 1) == ("done", "ok")
    assert ids.clear(key) is True
    assert ids.clear(key) is False
    decision, again = ids.acquire(key, "fp", now=NOW + 2)
    assert decision == "run" and again.owner != lease.owner


def test_keys_come_from_the_header_then_the_key_args_then_a_hash() -> None:
    arguments = {"order_id": "o1", "amount": 10}
    assert derive_key("shop.place", arguments, header="h-1") == "shop.place:h-1"
    by_args = derive_key("shop.place", arguments, key_args=("order_id",))
    assert by_args == f"shop.place:args:{hashlib.sha256(b'order_id=o1').hexdigest()}"
    assert "o1" not in by_args  # key names never embed argument values
    assert derive_key("shop.place", arguments) == f"shop.place:sha256:{fingerprint(arguments)}"
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


# -- @idempotent -------------------------------------------------------------------------


def test_idempotent_runs_once_per_arguments_and_returns_the_stored_result(
    bare_store: Store,
) -> None:
    calls: Counter[tuple[int, int]] = Counter()

    @idempotent(ttl=600, store=bare_store)
    def add(a: int, b: int) -> dict[str, int]:
        calls[(a, b)] += 1
        return {"sum": a + b}

    assert add(1, 2) == {"sum": 3}
    assert add(1, 2) == {"sum": 3}
    assert add(a=1, b=2) == {"sum": 3}  # bound by name: the same key
    assert add(2, 2) == {"sum": 4}
    assert calls == Counter({(1, 2): 1, (2, 2): 1})
    keys = list(bare_store.client.scan_iter(match=f"{bare_store.keys.prefix}:{{fn}}:idem:*"))
    assert len(keys) == 2
    assert all(0 < bare_store.client.ttl(k) <= 600 for k in keys)


def test_a_failing_call_releases_so_the_next_call_runs(bare_store: Store) -> None:
    attempts: list[int] = []

    @idempotent(store=lambda: bare_store)
    def charge(payment_id: str) -> str:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            raise ConnectionError("provider down")
        return f"charged {payment_id}"

    with pytest.raises(ConnectionError):
        charge("p1")
    assert charge("p1") == "charged p1"
    assert charge("p1") == "charged p1"
    assert attempts == [1, 2]


def test_the_same_key_args_with_other_arguments_is_a_conflict(bare_store: Store) -> None:
    calls: list[int] = []

    @idempotent(store=bare_store, key_args=("order_id",))
    def place(order_id: str, amount: int) -> int:
        calls.append(amount)
        return amount

    assert place("o1", 10) == 10
    with pytest.raises(IdempotencyConflict, match="same key, different arguments"):
        place("o1", 20)
    assert place("o2", 20) == 20
    assert calls == [10, 20]


# -- SideEffectWrapper -------------------------------------------------------------------


def test_a_side_effect_runs_once_and_then_returns_the_cached_result(bare_store: Store) -> None:
    effects = SideEffectWrapper(bare_store, ttl_seconds=900)
    sent: list[str] = []

    def place_order(order_id: str, amount: int) -> dict[str, Any]:
        sent.append(order_id)
        return {"order": order_id, "amount": amount}

    assert effects.run("ORDER_PLACEMENT", "42", place_order, "42", amount=5) == (
        True,
        {"order": "42", "amount": 5},
    )
    assert effects.run("ORDER_PLACEMENT", "42", place_order, "42", amount=5) == (
        False,
        {"order": "42", "amount": 5},
    )
    assert sent == ["42"]
    key = f"{bare_store.keys.prefix}:effect:ORDER_PLACEMENT:42"
    assert effects.key("ORDER_PLACEMENT", "42") == key
    assert bare_store.client.hget(key, "state") == "done"
    assert 0 < bare_store.client.ttl(key) <= 900


def test_racing_side_effects_for_one_entity_run_exactly_once(bare_store: Store) -> None:
    effects = SideEffectWrapper(bare_store)
    start = threading.Barrier(RACERS)
    losers_done = threading.Event()
    lock = threading.Lock()
    executed: list[str] = []
    outcomes: Counter[str] = Counter()

    def send_welcome(template: str) -> str:
        executed.append(threading.current_thread().name)
        # Hold the key until every other racer has been turned away.
        assert losers_done.wait(timeout=10), "the other racers never finished"
        return f"{template} sent by {threading.current_thread().name}"

    def race() -> None:
        start.wait(timeout=10)
        try:
            ran, _ = effects.run("EMAIL", "user-7", send_welcome, "welcome")
            outcome = "ran" if ran else "cached"
        except InProgress as exc:
            outcome = "in_progress" if 0 < exc.retry_after <= 60 else "bad retry_after"
        except Exception as exc:  # counted, so the assertion below names it
            outcome = type(exc).__name__
        with lock:
            outcomes[outcome] += 1
            if outcomes.total() - outcomes["ran"] == RACERS - 1:
                losers_done.set()

    threads = [threading.Thread(target=race, name=f"racer-{i}") for i in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(t.is_alive() for t in threads)
    assert outcomes == Counter({"ran": 1, "in_progress": RACERS - 1})
    assert len(executed) == 1
    assert effects.run("EMAIL", "user-7", send_welcome, "welcome") == (
        False,
        f"welcome sent by {executed[0]}",
    )
    assert len(executed) == 1


# -- security ----------------------------------------------------------------------------


def test_mask_secret_keeps_only_the_last_four_characters() -> None:
    assert mask_secret("sk_live_1234567890abcdef") == "***cdef"
    assert mask_secret("short") == MASK
    assert mask_secret("12345678") == MASK  # not longer than twice the visible part
    assert mask_secret("") == MASK


def test_masker_masks_configured_values_anywhere_in_nested_data() -> None:
    masker = Masker(["sk_live_1234567890abcdef", "hunter22", "abc", ""])
    data = {
        "message": "charge failed with key sk_live_1234567890abcdef",
        "args": ["x", ("pw=hunter22", 3)],
        "nested": {"deep": [{"note": "hunter22hunter22"}]},
        "count": 7,
        "short": "abc stays: too short to mask by value",
    }
    assert masker.data(data) == {
        "message": "charge failed with key ***",
        "args": ["x", ["pw=***", 3]],
        "nested": {"deep": [{"note": "******"}]},
        "count": 7,
        "short": "abc stays: too short to mask by value",
    }


def test_masker_masks_url_passwords_and_values_under_sensitive_keys() -> None:
    masker = Masker()
    assert masker.text("redis://app:s3cr3t@db:6379/0 and amqp://guest:guest@mq//") == (
        "redis://app:***@db:6379/0 and amqp://guest:***@mq//"
    )
    assert masker.text("http://example.com/path") == "http://example.com/path"
    assert masker.data(
        {
            "password": "x1",
            "api_key": "k",
            "Authorization": "Bearer t",
            "refresh_token": "r",
            "user": "bob",
            "retries": 3,
        }
    ) == {
        "password": MASK,
        "api_key": MASK,
        "Authorization": MASK,
        "refresh_token": MASK,
        "user": "bob",
        "retries": 3,
    }
    assert masker.processor(None, "info", {"event": "x", "client_secret": "abc"}) == {
        "event": "x",
        "client_secret": MASK,
    }


# -- deadlines ---------------------------------------------------------------------------


def test_deadlines_parse_as_aware_utc_or_not_at_all() -> None:
    expected = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_deadline("2030-01-02T03:04:05Z") == expected
    assert parse_deadline("2030-01-02T05:04:05+02:00") == expected
    assert parse_deadline("2030-01-02T03:04:05") == expected  # naive means UTC
    assert parse_deadline("") is None and parse_deadline(None) is None
    assert parse_deadline("tomorrow") is None
    assert validate_deadline("tomorrow") == "deadline header 'tomorrow' is not ISO-8601"
    assert validate_deadline("2030-01-02T03:04:05Z") is None and validate_deadline(None) is None
    assert format_deadline(expected) == "2030-01-02T03:04:05Z"
    assert parse_deadline(format_deadline(expected)) == expected


def test_the_soft_limit_shrinks_to_the_time_left_but_stays_positive() -> None:
    deadline = datetime.fromtimestamp(NOW, tz=UTC) + timedelta(seconds=30)
    assert remaining_seconds(deadline, now=NOW) == 30.0
    assert remaining_seconds(deadline, now=NOW + 40) == -10.0
    assert remaining_seconds(None, now=NOW) is None
    assert soft_limit(300.0, deadline, now=NOW) == 30.0
    assert soft_limit(10.0, deadline, now=NOW) == 10.0
    assert soft_limit(None, deadline, now=NOW) == 30.0
    assert soft_limit(300.0, deadline, now=NOW + 40) == 0.05
    assert soft_limit(300.0, None, now=NOW) == 300.0
