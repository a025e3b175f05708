"""The breaker monitor: snapshots with history, one alert per episode, fleet-wide.

Breakers run on the real breaker scripts with a logical clock (``now``), against real
Redis; monitors read the same keys. The last test runs the beat job in a real worker.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from reliability.alerts import AlertHooks, recent_alerts
from reliability.breaker import SERVICE_DEFAULTS, BreakerConfig, BreakerMode, CircuitBreaker
from reliability.breaker.monitor import (
    FLAPPING,
    OPEN_TOO_LONG,
    BreakerMonitor,
    MonitorPolicy,
    latest_snapshots,
    snapshot_history,
)
from reliability.errors import TransientError
from reliability.jobs import Jobs
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import Environment, WorkerProcess, delete_prefix, wait_until
from worker.sandbox import SandboxProvider

START = 1_000_000.0
QUICK = BreakerConfig(
    failure_threshold=2, recovery_timeout=30.0, half_open_max_calls=1, success_threshold=1
)
POLICY = MonitorPolicy(open_alert_seconds=60.0, flaps_per_hour=3)


class Recorder:
    """A hook that remembers every alert (thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, event_type: str, message: str, context: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append((event_type, message, context))

    def events(self) -> list[str]:
        return [event for event, _, _ in self.calls]


def hooks_with(recorder: Recorder) -> AlertHooks:
    hooks = AlertHooks()
    hooks.add_event_hook(recorder)
    return hooks


def trip(breaker: CircuitBreaker, at: float) -> None:
    """Two failures at ``at``: closed -> open."""
    for i in range(2):
        breaker.admit(f"fail-{at}-{i}", now=at)
        breaker.record(f"fail-{at}-{i}", TransientError("503"), 0.01, now=at)


def trial(breaker: CircuitBreaker, at: float, error: BaseException | None) -> str:
    """One half-open trial call at ``at`` (the breaker half-opens by time first)."""
    breaker.admit(f"trial-{at}", now=at)
    return breaker.record(f"trial-{at}", error, 0.01, now=at)


def cycle(breaker: CircuitBreaker, at: float) -> float:
    """closed -> open -> half_open -> closed; returns the next free time."""
    trip(breaker, at)
    assert trial(breaker, at + QUICK.recovery_timeout, None) == "closed"
    return at + QUICK.recovery_timeout + 1


@pytest.fixture
def breaker(bare_store: Store) -> CircuitBreaker:
    return CircuitBreaker("payments-api", bare_store, QUICK)


def test_a_breaker_held_open_past_the_threshold_alerts_once_per_episode(
    bare_store: Store, breaker: CircuitBreaker
) -> None:
    seen = Recorder()
    monitor = BreakerMonitor(bare_store, [breaker], hooks_with(seen), POLICY)
    trip(breaker, START)
    assert monitor.run(now=START + 59)["alerts"] == 0  # not yet past the threshold
    # Past it: open, then half-open by time, then open again (a failed trial), then still
    # half-open with nobody calling: one episode, one alert, over many runs.
    runs = [monitor.run(now=START + t)["alerts"] for t in (60, 61, 90, 120)]
    assert trial(breaker, START + 121, TransientError("still down")) == "open"
    runs += [monitor.run(now=START + t)["alerts"] for t in (122, 200, 400)]
    assert runs == [1, 0, 0, 0, 0, 0, 0]
    [(event, message, context)] = seen.calls
    assert event == OPEN_TOO_LONG
    assert message == "circuit breaker payments-api has not closed for 60s (alert after 60s)"
    assert (context["breaker"], context["state"], context["down_since"]) == (
        "payments-api",
        "half_open",  # by time, 30 s after it opened: not closed, the episode goes on
        START,
    )
    assert (context["down_seconds"], context["open_alert_seconds"]) == (60.0, 60.0)
    # It closes (the episode ends), trips again: a new episode, a second alert when due.
    assert trial(breaker, START + 452, None) == "closed"
    assert monitor.run(now=START + 453)["alerts"] == 0
    trip(breaker, START + 500)
    assert [monitor.run(now=START + t)["alerts"] for t in (520, 560, 600)] == [0, 1, 0]
    assert seen.events() == [OPEN_TOO_LONG, OPEN_TOO_LONG]
    assert seen.calls[1][2]["down_since"] == START + 500


def test_two_monitors_running_at_once_raise_each_alert_once(
    bare_store: Store, second_store: Store, breaker: CircuitBreaker
) -> None:
    at = START
    for _ in range(5):  # five trips in the hour: flapping
        at = cycle(breaker, at)
    trip(breaker, at)  # and now open: past the threshold from at + 60 on
    seen = Recorder()
    monitors = [
        BreakerMonitor(
            store, [CircuitBreaker("payments-api", store, QUICK)], hooks_with(seen), POLICY
        )
        for store in (bare_store, second_store)
    ]
    barrier = threading.Barrier(2)
    results: list[int] = []

    def run(monitor: BreakerMonitor) -> None:
        for t in range(60, 70):
            barrier.wait(timeout=10)
            results.append(monitor.run(now=at + t)["alerts"])

    threads = [threading.Thread(target=run, args=(m,)) for m in monitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 20
    assert sum(results) == 2
    assert Counter(seen.events()) == {OPEN_TOO_LONG: 1, FLAPPING: 1}


def test_a_flapping_breaker_is_reported_with_its_flap_count(
    bare_store: Store, breaker: CircuitBreaker
) -> None:
    seen = Recorder()
    monitor = BreakerMonitor(bare_store, [breaker], hooks_with(seen), POLICY)
    at = START
    for _ in range(3):
        at = cycle(breaker, at)
    assert monitor.run(now=at)["flapping"] == 0  # 3 trips: not more than 3
    at = cycle(breaker, at)
    assert monitor.run(now=at) == {"breakers": 1, "not_closed": 0, "flapping": 1, "alerts": 1}
    at = cycle(breaker, at)
    assert monitor.run(now=at)["alerts"] == 0  # still the same episode
    [snap] = latest_snapshots(bare_store)
    assert (snap["flaps_last_hour"], snap["transitions_last_hour"]) == (5, 15)
    [(event, message, context)] = seen.calls
    assert event == FLAPPING
    assert message == "circuit breaker payments-api opened 4 times in the last hour (more than 3)"
    assert (context["flaps_last_hour"], context["flaps_per_hour"]) == (4, 3)
    # The hour moves on: 3 trips in it (not below 3) keeps the episode, 2 ends it.
    first_trips = [START + 31 * i for i in range(5)]
    assert monitor.run(now=first_trips[1] + 3600)["alerts"] == 0
    assert latest_snapshots(bare_store)[0]["flaps_last_hour"] == 3
    assert monitor.run(now=first_trips[2] + 3600)["alerts"] == 0
    assert latest_snapshots(bare_store)[0]["flaps_last_hour"] == 2
    at = first_trips[2] + 3601
    for _ in range(4):  # the old trips age out; 4 new ones in the hour: a new episode
        at = cycle(breaker, at)
    assert monitor.run(now=at)["alerts"] == 1
    assert [c["flaps_last_hour"] for _, _, c in seen.calls] == [4, 4]


def test_a_snapshot_shows_state_mode_rates_and_time_in_state(bare_store: Store) -> None:
    config = BreakerConfig(
        failure_threshold=0,
        failure_rate_threshold=0.9,
        window_size=10,
        minimum_requests=10,
        slow_call_seconds=1.0,
    )
    timed = BreakerConfig(failure_threshold=0, window_type="time", window_size=60)
    counted = CircuitBreaker("counted", bare_store, config)
    by_time = CircuitBreaker("timed", bare_store, timed)
    # counted: 3 fast successes, 2 slow successes, 3 failures (the last call failed).
    calls = [(None, 0.1)] * 3 + [(None, 2.0)] * 2 + [(TransientError("x"), 0.1)] * 3
    for i, (error, seconds) in enumerate(calls):
        counted.admit(f"c{i}", now=START)
        counted.record(f"c{i}", error, seconds, now=START)
    # timed: a failure 61 s ago has left the window; 1 failure and 3 successes are in it.
    for i, (error, at) in enumerate([(TransientError("old"), START - 61)] + [(None, START)] * 3):
        by_time.record(f"t{i}", error, 0.1, now=at)
    by_time.record("t-last", TransientError("x"), 0.1, now=START - 10)
    monitor = BreakerMonitor(bare_store, [counted, by_time], AlertHooks(), POLICY)
    assert monitor.run(now=START) == {"breakers": 2, "not_closed": 0, "flapping": 0, "alerts": 0}
    shown = {s["breaker"]: s for s in latest_snapshots(bare_store)}
    assert shown["counted"] == {
        "breaker": "counted",
        "at": START,
        "state": "closed",
        "mode": "normal",
        "failure_rate": 0.375,
        "slow_call_rate": 0.25,
        "window_calls": 8,
        "failure_count": 3,
        "time_in_state_seconds": None,
        "down_since": None,
        "down_seconds": None,
        "open_until": None,
        "transitions_last_hour": 0,
        "flaps_last_hour": 0,
    }
    assert (shown["timed"]["window_calls"], shown["timed"]["failure_rate"]) == (4, 0.25)
    # Forced open by an operator: shown as such; its state machine (closed) raises nothing.
    counted.set_mode(BreakerMode.FORCED_OPEN)
    assert monitor.run(now=START + 3600)["alerts"] == 0
    forced = {s["breaker"]: s for s in latest_snapshots(bare_store)}["counted"]
    assert (forced["state"], forced["mode"]) == ("closed", "forced_open")


def test_history_is_bounded_by_count_and_by_age(bare_store: Store) -> None:
    breakers = [CircuitBreaker(name, bare_store, QUICK) for name in ("a", "b")]
    monitor = BreakerMonitor(
        bare_store, breakers, AlertHooks(), MonitorPolicy(history_max_entries=5)
    )
    for i in range(4):
        monitor.run(now=START + i)
    history = snapshot_history(bare_store)
    assert [(s["breaker"], s["at"]) for s in history] == [
        ("b", START + 3),
        ("a", START + 3),
        ("b", START + 2),
        ("a", START + 2),
        ("b", START + 1),
    ]
    assert [s["at"] for s in snapshot_history(bare_store, "a", count=2)] == [START + 3, START + 2]
    assert [s["at"] for s in latest_snapshots(bare_store)] == [START + 3, START + 3]
    # By age: entries older than history_seconds (Redis time) go at the next run.
    aged = BreakerMonitor(bare_store, breakers, AlertHooks(), MonitorPolicy(history_seconds=0.2))
    ran_at = bare_store.now()
    wait_until(lambda: bare_store.now() > ran_at + 0.3, timeout=5, message="0.3 s of Redis time")
    aged.run(now=START + 10)
    assert [(s["breaker"], s["at"]) for s in snapshot_history(bare_store)] == [
        ("b", START + 10),
        ("a", START + 10),
    ]


def test_a_failing_hook_does_not_break_the_monitor_run(
    bare_store: Store, breaker: CircuitBreaker
) -> None:
    seen = Recorder()

    def broken(_event: str, _message: str, _context: dict[str, Any]) -> None:
        raise RuntimeError("pager down")

    hooks = AlertHooks()
    hooks.add_log_hook(broken)
    hooks.add_event_hook(seen)
    trip(breaker, START)
    monitor = BreakerMonitor(bare_store, [breaker], hooks, POLICY)
    assert monitor.run(now=START + 60)["alerts"] == 1
    assert seen.events() == [OPEN_TOO_LONG]
    assert latest_snapshots(bare_store)[0]["state"] == "half_open"


@pytest.fixture
def job_env(redis_url: str, sandbox: SandboxProvider) -> Iterator[Environment]:
    env = Environment(
        redis_url=redis_url,
        sandbox_url=sandbox.url,
        extra={
            "RELIABLE_MONITOR__OPEN_ALERT_SECONDS": "0.5",
            "RELIABLE_ALERTS__WEBHOOK_URL": f"{sandbox.url}/webhooks/pager?token=hook-s3cret",
            "RELIABLE_ALERTS__WEBHOOK_BACKOFF_SECONDS": "0.05",
        },
    )
    yield env
    delete_prefix(redis_url, env.prefix)


def test_the_beat_job_snapshots_every_breaker_and_alerts_once(
    job_env: Environment, sandbox: SandboxProvider
) -> None:
    store = Store(job_env.redis_url, job_env.prefix)
    payment = CircuitBreaker("payment", store, SERVICE_DEFAULTS["payment"])
    for i in range(SERVICE_DEFAULTS["payment"].failure_threshold):
        payment.admit(f"f{i}")
        payment.record(f"f{i}", TransientError("503"), 0.01)
    opened = store.now()
    wait_until(lambda: store.now() > opened + 0.6, timeout=5, message="past the threshold")
    producer = job_env.producer()
    with WorkerProcess(job_env, concurrency=1):
        replies = [
            producer.send_task("maintenance.breaker_monitor", kwargs={"slot": slot}).get(timeout=30)
            for slot in (1, 1, 2)
        ]
        webhooks = lambda: [c["body"] for c in sandbox.effects("webhooks")]  # noqa: E731
        wait_until(
            lambda: (
                {"circuit_breaker_opened", "circuit_breaker_open_too_long"}
                <= {b["event"] for b in webhooks()}
            ),
            timeout=30,
            message="the transition and the monitor alert reach the webhook",
        )
    assert [(r["ran"], r.get("alerts")) for r in replies] == [(True, 1), (False, None), (True, 0)]
    assert [run.slot for run in Jobs(store).runs("breaker-monitor")] == [2, 1]
    alerts = Counter(a["event"] for a in recent_alerts(store))
    assert alerts == {"circuit_breaker_opened": 1, "circuit_breaker_open_too_long": 1}
    [pager] = [b for b in webhooks() if b["event"] == "circuit_breaker_open_too_long"]
    assert (pager["breaker"], pager["state"], pager["open_alert_seconds"]) == (
        "payment",
        "open",
        0.5,
    )
    shown = run_cli(job_env, "monitor", "--json")
    assert shown.returncode == 0, shown.stderr
    states = {s["breaker"]: (s["state"], s["failure_count"]) for s in json.loads(shown.stdout)}
    assert states["payment"] == ("open", 5)
    assert {"analytics", "database", "notification", "test-breaker"} <= set(states)
    assert "hook-s3cret" not in json.dumps(sandbox.effects("webhooks"))
