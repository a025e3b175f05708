"""The Lua state machines against small Python reference models, on a logical clock.

Real Redis, real scripts; ``now`` is passed to every script (ARGV[1]) and advanced by
the test, never by sleeping. Two models (the retry budget's is in test_retry_budget.py):

* the idempotency lease (acquire / renew / complete / release) with competing holders,
* the parked-message claim the mover uses before publishing.
"""

from __future__ import annotations

import math
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from reliability import idempotency_store
from reliability.deferral import CLAIM_PARKED
from reliability.errors import IdempotencyConflict
from reliability.idempotency import canonical
from reliability.idempotency_store import IdempotencyStore, InProgress, Lease
from reliability.store import Store

# Logical clocks start far from zero, on a grid of exact binary fractions.
START = 1_000_000.0
# Redis TTLs are real seconds; every example finishes long before this.
TTL_SECONDS = 3600
NAMES = ("a", "b")
FINGERPRINTS = ("fp-1", "fp-2")
LEASE_SECONDS = (1.0, 2.5, 4.0)
STEPS = (0.25, 0.5, 1.0, 2.5, 4.0)
# Owner tokens: pipeline owners (host:delivery tag:task id) can repeat, so the same
# owner may re-acquire after its own lease lapsed; only the fence tells them apart.
OWNERS = ("w1", "w2", "w3", None)  # None: a fresh random token


def unique_prefix() -> str:
    return "m" + uuid.uuid4().hex[:10]


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.unlink(*keys)


# -- idempotency lease -------------------------------------------------------------------


@dataclass
class KeyModel:
    """What one idempotency key should hold."""

    state: str | None = None
    fp: str = ""
    owner: str = ""
    fence: int = 0
    until: float = 0.0
    result: Any = None

    def live(self, now: float) -> bool:
        return self.state == "running" and self.until > now

    def holds(self, lease: Lease) -> bool:
        return self.state == "running" and self.owner == lease.owner and self.fence == lease.fence


class LeaseMachine(RuleBasedStateMachine):
    """Several holders compete for one or two keys; Redis must match the model."""

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.store = Store(self.redis_url, unique_prefix())
        self.ids = IdempotencyStore(self.store)
        self.now = START
        self.model = {self.ids.redis_key(n): KeyModel() for n in NAMES}
        self.fences: dict[str, list[int]] = {key: [] for key in self.model}
        self.issued: list[Lease] = []

    def teardown(self) -> None:
        delete_prefix(self.store.client, self.store.keys.prefix)
        self.store.close()

    def live_holders(self, key: str) -> list[Lease]:
        """Issued leases that Redis itself says are held and unexpired right now."""
        h = self.store.client.hgetall(key)
        if h.get("state") != "running" or float(h.get("until", "0")) <= self.now:
            return []
        return [
            lease
            for lease in self.issued
            if lease.key == key
            and h.get("owner") == lease.owner
            and h.get("fence") == str(lease.fence)
        ]

    @rule(
        target=leases,
        name=st.sampled_from(NAMES),
        fp=st.sampled_from(FINGERPRINTS),
        lease_seconds=st.sampled_from(LEASE_SECONDS),
        owner=st.sampled_from(OWNERS),
    )
    def acquire(self, name: str, fp: str, lease_seconds: float, owner: str | None) -> Any:
        key = self.ids.redis_key(name)
        m = self.model[key]
        holders_before = self.live_holders(key)
        token = SimpleNamespace(hex=owner or uuid.uuid4().hex)
        try:
            with mock.patch.object(idempotency_store, "uuid", SimpleNamespace(uuid4=lambda: token)):
                decision, value = self.ids.acquire(
                    key, fp, lease_seconds=lease_seconds, ttl_seconds=TTL_SECONDS, now=self.now
                )
        except InProgress as exc:
            assert m.live(self.now) and m.fp == fp
            assert exc.retry_after == pytest.approx(m.until - self.now)
            return multiple()
        except IdempotencyConflict:
            assert (m.state == "done" or m.live(self.now)) and m.fp != fp
            return multiple()
        if decision == "done":
            # A completed key returns its stored result and never runs again.
            assert m.state == "done" and m.fp == fp
            assert value == m.result
            return multiple()
        assert decision == "run"
        lease: Lease = value
        # Granted only when nobody held the key live (released, lapsed or never taken).
        assert holders_before == []
        assert m.state != "done" and not m.live(self.now)
        # Fences strictly increase per key across acquisitions.
        assert all(lease.fence > f for f in self.fences[key])
        assert lease.fence == m.fence + 1
        self.fences[key].append(lease.fence)
        self.model[key] = KeyModel(
            "running", fp, lease.owner, lease.fence, self.now + lease_seconds
        )
        self.issued.append(lease)
        return lease

    @rule(lease=leases, lease_seconds=st.sampled_from(LEASE_SECONDS))
    def renew(self, lease: Lease, lease_seconds: float) -> None:
        m = self.model[lease.key]
        renewed = self.ids.renew(lease, lease_seconds, now=self.now)
        if lease.fence < m.fence:
            assert not renewed, "a stale holder renewed a lease taken over by a successor"
        assert renewed == m.holds(lease)
        if renewed:
            m.until = self.now + lease_seconds

    @rule(lease=leases)
    def complete(self, lease: Lease) -> None:
        m = self.model[lease.key]
        result = {"fence": lease.fence, "by": lease.owner[:8], "at": self.now}
        completed = self.ids.complete(lease, result, TTL_SECONDS, now=self.now)
        if lease.fence < m.fence:
            assert not completed, "a stale holder completed a key taken over by a successor"
        assert completed == m.holds(lease)
        if completed:
            m.state, m.owner, m.until, m.result = "done", "", 0.0, result

    @rule(lease=leases)
    def release(self, lease: Lease) -> None:
        m = self.model[lease.key]
        released = self.ids.release(lease, now=self.now)
        if lease.fence < m.fence:
            assert not released, "a stale holder released a key taken over by a successor"
        assert released == m.holds(lease)
        if released:
            m.state, m.owner, m.until = "released", "", 0.0

    @rule(seconds=st.sampled_from(STEPS))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def at_most_one_live_holder_per_key(self) -> None:
        for key in self.model:
            assert len(self.live_holders(key)) <= 1

    @invariant()
    def redis_matches_the_model(self) -> None:
        client = self.store.client
        for key, m in self.model.items():
            h = client.hgetall(key)
            score = client.zscore(self.store.keys.leases, key)
            if m.state is None:
                assert h == {} and score is None
                continue
            assert h["state"] == m.state
            assert h["fp"] == m.fp
            assert int(h["fence"]) == m.fence
            if m.state == "running":
                assert h["owner"] == m.owner
                assert float(h["until"]) == m.until
                assert score == m.until
            else:
                assert "owner" not in h and "until" not in h
                assert score is None
            if m.state == "done":
                assert h["result"] == canonical(m.result)


def test_idempotency_leases_follow_the_reference_model(redis_url: str) -> None:
    machine = type("RedisLeaseMachine", (LeaseMachine,), {"redis_url": redis_url})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=100,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_a_lapsed_lease_is_taken_over_and_the_paused_holder_is_fenced_out(
    bare_store: Store,
) -> None:
    ids = IdempotencyStore(bare_store)
    key = ids.redis_key("payment-1")
    _, first = ids.acquire(key, "fp", lease_seconds=5, now=START)
    with pytest.raises(InProgress):
        ids.acquire(key, "fp", lease_seconds=5, now=START + 4.75)
    decision, second = ids.acquire(key, "fp", lease_seconds=5, now=START + 5)
    assert decision == "run" and second.fence == first.fence + 1
    assert not ids.renew(first, 5, now=START + 5.5)
    assert not ids.complete(first, {"late": True}, TTL_SECONDS, now=START + 5.5)
    assert not ids.release(first, now=START + 5.5)
    assert ids.complete(second, {"ok": 1}, TTL_SECONDS, now=START + 6)
    assert ids.acquire(key, "fp", now=START + 100) == ("done", {"ok": 1})


# -- parked-message claim ----------------------------------------------------------------

parked_entries = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=40).map(lambda n: n * 0.5),
        st.integers(min_value=0, max_value=3).map(bool),
    ),  # 1 in 4 lost its envelope
    min_size=1,
    max_size=12,
)
mover_steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=12).map(lambda n: n * 0.5),
        st.integers(min_value=1, max_value=5),
        st.booleans(),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=100, deadline=None)
@given(entries=parked_entries, steps=mover_steps, claim_seconds=st.sampled_from((1.0, 3.0, 7.5)))
def test_parked_claims_hand_out_each_due_entry_once_per_claim_in_due_order(
    redis_url: str,
    entries: list[tuple[float, bool]],
    steps: list[tuple[float, int, bool]],
    claim_seconds: float,
) -> None:
    store = Store(redis_url, unique_prefix())
    k, client = store.keys, store.client
    due = {f"p{i:02d}": START + offset for i, (offset, _) in enumerate(entries)}
    envelopes = {pid: f"msg-{pid}" for pid, (_, has) in zip(due, entries, strict=True) if has}
    client.zadd(k.parked, due)
    if envelopes:
        client.hset(k.parked_msgs, mapping=envelopes)
    claimed_until: dict[str, float] = {}
    handed_out: Counter[str] = Counter()
    confirmed: set[str] = set()
    now = START

    def claim(limit: int) -> list[str]:
        flat = store.run(
            CLAIM_PARKED, [k.parked, k.parked_msgs], [now, limit, claim_seconds], "claim parked"
        )
        ids = flat[0::2]
        assert flat[1::2] == [envelopes[pid] for pid in ids]
        # The model: due entries by (due, id), first `limit`; no envelope -> dropped.
        window = sorted((s, pid) for pid, s in due.items() if s <= now)[:limit]
        assert ids == [pid for _, pid in window if pid in envelopes]
        for _, pid in window:
            if pid in envelopes:
                # Never handed out twice while its claim holds.
                assert now >= claimed_until.get(pid, -math.inf)
                claimed_until[pid] = due[pid] = now + claim_seconds
                handed_out[pid] += 1
            else:
                del due[pid]
        return ids

    def confirm(ids: list[str]) -> None:
        for pid in ids:
            client.zrem(k.parked, pid)
            client.hdel(k.parked_msgs, pid)
            del due[pid]
            confirmed.add(pid)

    try:
        for gap, limit, confirms in steps:
            now += gap
            ids = claim(limit)
            if confirms:
                confirm(ids)
        # Drain: every entry still parked (never claimed, or claimed and not confirmed)
        # is due once every claim has lapsed, and is handed out exactly once more.
        now += 100.0
        leftover = claim(1000)
        assert sorted(leftover) == sorted(set(envelopes) - confirmed)
        confirm(leftover)
        assert client.zcard(k.parked) == 0 and client.hlen(k.parked_msgs) == 0
        assert set(handed_out) == set(envelopes)
    finally:
        delete_prefix(client, k.prefix)
        store.close()


def test_an_unconfirmed_claim_is_due_again_after_claim_seconds(bare_store: Store) -> None:
    k = bare_store.keys
    bare_store.client.zadd(k.parked, {"late": START + 2, "early": START + 1})
    bare_store.client.hset(k.parked_msgs, mapping={"late": "L", "early": "E"})

    def claim(now: float) -> list[str]:
        return bare_store.run(
            CLAIM_PARKED, [k.parked, k.parked_msgs], [now, 10, 30], "claim parked"
        )

    assert claim(START) == []
    assert claim(START + 2) == ["early", "E", "late", "L"]
    assert claim(START + 31.5) == []
    assert claim(START + 32) == ["early", "E", "late", "L"]
