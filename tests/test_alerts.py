"""Breaker transitions reach logs, metrics and alert hooks once, fleet-wide.

Transitions are produced with the real breaker scripts on a logical clock; the stream is
read by :class:`BreakerEvents` through its consumer group on real Redis, as the
maintenance leader does.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from structlog.testing import capture_logs

from reliability.alerts import AlertHooks
from reliability.breaker import BreakerConfig, CircuitBreaker, CircuitBreakerError, alerts
from reliability.breaker.alerts import BreakerEvents, default_hooks
from reliability.errors import TransientError
from reliability.metrics import BREAKER_TRANSITIONS as TRANSITIONS
from reliability.store import Store
from tests.support.fleet import wait_until
from worker.sandbox import SandboxProvider

START = 1_000_000.0
QUICK = BreakerConfig(
    failure_threshold=2, recovery_timeout=1.0, half_open_max_calls=1, success_threshold=1
)


class Recorder:
    """A hook that remembers every call (thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, event_type: str, message: str, context: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append((event_type, message, context))


def cycle(breaker: CircuitBreaker, at: float) -> float:
    """closed -> open -> half_open -> closed, three transitions; returns the next time."""
    for i in range(2):
        breaker.admit(f"fail-{at}-{i}", now=at)
        breaker.record(f"fail-{at}-{i}", TransientError("503"), 0.01, now=at)
    trial_at = at + QUICK.recovery_timeout
    breaker.admit(f"trial-{at}", now=trial_at)
    assert breaker.record(f"trial-{at}", None, 0.01, now=trial_at) == "closed"
    return trial_at + 1


def stream_ids(store: Store) -> dict[tuple[str, str, str, float], str]:
    """Stream entry id by (breaker, from, to, at): unique here, so hooks can be matched."""
    entries = store.client.xrange(f"{store.keys.prefix}:cb:events")
    ids = {(f["breaker"], f["from"], f["to"], float(f["at"])): entry_id for entry_id, f in entries}
    assert len(ids) == len(entries)
    return ids


def pending(store: Store) -> int:
    return int(store.client.xpending(f"{store.keys.prefix}:cb:events", alerts.GROUP)["pending"])


def hooks_with(*recorders: Recorder) -> AlertHooks:
    hooks = AlertHooks()
    for recorder in recorders:
        hooks.add_metric_hook(recorder)
    return hooks


@pytest.fixture
def breaker(bare_store: Store) -> CircuitBreaker:
    return CircuitBreaker("payments-api", bare_store, QUICK)


def test_two_consumers_polling_concurrently_deliver_each_transition_exactly_once(
    bare_store: Store, second_store: Store, breaker: CircuitBreaker
) -> None:
    seen_a, seen_b = Recorder(), Recorder()
    consumers = [
        BreakerEvents(bare_store, hooks_with(seen_a), consumer="host-a"),
        BreakerEvents(second_store, hooks_with(seen_b), consumer="host-b"),
    ]
    stop = threading.Event()

    def poll(events: BreakerEvents) -> None:
        while not stop.is_set():
            events.deliver(count=2)
            stop.wait(0.002)

    threads = [threading.Thread(target=poll, args=(c,), daemon=True) for c in consumers]
    for thread in threads:
        thread.start()
    at = START
    try:
        for _ in range(10):  # transitions appear while both poll
            at = cycle(breaker, at)
        wait_until(
            lambda: len(seen_a.calls) + len(seen_b.calls) >= 30,
            timeout=10,
            message="30 transitions delivered",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    ids = stream_ids(bare_store)
    assert len(ids) == 30
    delivered = Counter(
        ids[(c["breaker"], c["from"], c["to"], c["at"])] for _, _, c in seen_a.calls + seen_b.calls
    )
    assert delivered == Counter(ids.values())  # every entry once, none twice
    assert pending(bare_store) == 0
    assert [c.deliver() for c in consumers] == [0, 0]


def test_a_failing_hook_does_not_stop_the_others_and_the_entry_is_still_settled(
    bare_store: Store, breaker: CircuitBreaker
) -> None:
    before, after = Recorder(), Recorder()

    def broken(_event: str, _message: str, _context: dict[str, Any]) -> None:
        raise RuntimeError("pager relay down")

    hooks = AlertHooks()
    hooks.add_log_hook(before)
    hooks.add_metric_hook(broken)
    hooks.add_webhook_hook(after)
    events = BreakerEvents(bare_store, hooks, consumer="leader")
    cycle(breaker, START)
    with capture_logs() as logs:
        assert events.deliver() == 3
    assert (
        [e for e, _, _ in before.calls]
        == [e for e, _, _ in after.calls]
        == ["circuit_breaker_opened", "circuit_breaker_half_open", "circuit_breaker_closed"]
    )
    failures = [e for e in logs if e["event"] == "alert_hook_failed"]
    assert [(e["hook"], e["event_type"], e["error"]) for e in failures] == [
        ("broken", name, "pager relay down")
        for name in (
            "circuit_breaker_opened",
            "circuit_breaker_half_open",
            "circuit_breaker_closed",
        )
    ]
    assert pending(bare_store) == 0
    assert events.deliver() == 0


def test_entries_a_dead_consumer_read_but_never_acked_are_claimed_after_the_idle_time(
    bare_store: Store, breaker: CircuitBreaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Recorder()
    live = BreakerEvents(bare_store, hooks_with(seen), consumer="next-leader")
    assert live.deliver() == 0  # creates the group on an empty stream
    cycle(breaker, START)
    stream = f"{bare_store.keys.prefix}:cb:events"
    # The old leader read everything and died before acknowledging.
    read = bare_store.client.xreadgroup(alerts.GROUP, "old-leader", {stream: ">"})
    assert len(read[0][1]) == 3
    monkeypatch.setattr(alerts, "CLAIM_IDLE_MS", 60_000)
    assert live.deliver() == 0  # not idle long enough: the old leader may still ack
    assert seen.calls == []
    monkeypatch.setattr(alerts, "CLAIM_IDLE_MS", 50)
    wait_until(
        lambda: live.deliver() or seen.calls,
        timeout=5,
        message="the next leader claims the pending entries",
    )
    assert [(c["from"], c["to"]) for _, _, c in seen.calls] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert pending(bare_store) == 0
    assert live.deliver() == 0


def test_transitions_are_logged_and_counted_as_circuit_breaker_events(
    bare_store: Store, breaker: CircuitBreaker
) -> None:
    opened = TRANSITIONS.labels("payments-api", "open")._value.get()
    closed = TRANSITIONS.labels("payments-api", "closed")._value.get()
    events = BreakerEvents(bare_store, default_hooks(), consumer="leader")
    for i in range(2):
        breaker.admit(f"f{i}", now=START)
        breaker.record(f"f{i}", TransientError("503"), 0.01, now=START)
    with capture_logs() as logs:
        with pytest.raises(CircuitBreakerError):
            breaker.admit("refused", now=START + 0.5)
        assert events.deliver() == 1
        breaker.admit("trial", now=START + 1)
        breaker.record("trial", None, 0.01, now=START + 1)
        assert events.deliver() == 2
    named = [
        (e["event"], e["log_level"]) for e in logs if e["event"].startswith("circuit_breaker_")
    ]
    assert named == [
        ("circuit_breaker_rejected_call", "info"),
        ("circuit_breaker_opened", "warning"),
        ("circuit_breaker_half_open", "info"),
        ("circuit_breaker_closed", "info"),
    ]
    first = next(e for e in logs if e["event"] == "circuit_breaker_opened")
    assert (first["breaker"], first["from"], first["to"], first["reason"], first["at"]) == (
        "payments-api",
        "closed",
        "open",
        "2 consecutive failures",
        START,
    )
    assert TRANSITIONS.labels("payments-api", "open")._value.get() == opened + 1
    assert TRANSITIONS.labels("payments-api", "closed")._value.get() == closed + 1
    # The state itself is the fleet collector's (tests/test_metrics.py, ops /metrics).


def test_a_webhook_hook_posts_each_transition_as_json(
    bare_store: Store, breaker: CircuitBreaker, sandbox: SandboxProvider
) -> None:
    hooks = AlertHooks()
    hooks.add_webhook_url(f"{sandbox.url}/webhooks/breaker-alerts", backoff_seconds=0.01)
    events = BreakerEvents(bare_store, hooks, consumer="leader")
    cycle(breaker, START)
    assert events.deliver() == 3
    calls = sandbox.effects("webhooks")
    assert [(c["path"], c["status"]) for c in calls] == [("/webhooks/breaker-alerts", 200)] * 3
    assert calls[0]["body"] == {
        "event": "circuit_breaker_opened",
        "message": "circuit breaker payments-api closed -> open",
        "breaker": "payments-api",
        "from": "closed",
        "to": "open",
        "reason": "2 consecutive failures",
        "mode": "normal",
        "at": START,
    }
    assert [c["body"]["event"] for c in calls[1:]] == [
        "circuit_breaker_half_open",
        "circuit_breaker_closed",
    ]
    # A relay that keeps answering 503 gets each alert 3 times (one idempotency key per
    # alert), then the hook fails: logged, and the transition is settled all the same.
    sandbox.set_faults(outage=True)
    cycle(breaker, START + 10)
    with capture_logs() as logs:
        assert events.deliver() == 3
    assert [e["event"] for e in logs].count("alert_hook_failed") == 3
    failed = sandbox.effects("webhooks")[3:]
    assert [c["status"] for c in failed] == [503] * 9
    assert [c["idempotency_key"] for c in failed] == [
        key for key in dict.fromkeys(c["idempotency_key"] for c in failed) for _ in range(3)
    ]
    assert pending(bare_store) == 0
