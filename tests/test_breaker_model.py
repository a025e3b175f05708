"""The circuit breaker's Lua state machine against a small Python reference model.

Real Redis, real scripts; ``now`` is passed to every call and advanced by the test, never
by sleeping. The stateful test draws a breaker policy, then admits calls, records their
outcomes (success, failure, ignored; fast or slow), moves the clock, switches modes and
resets; after every step Redis must hold exactly the model's state, trial leases and
transition events. The example tests below cover the stream, the admin operations, the
error classification and the ways to call through a breaker outside tasks.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from reliability.breaker import (
    BreakerConfig,
    BreakerMode,
    CircuitBreaker,
    CircuitBreakerError,
    CircuitState,
)
from reliability.errors import (
    BackendUnavailable,
    IdempotencyConflict,
    PermanentError,
    TransientError,
)
from reliability.store import Store
from tests.support.fleet import delete_prefix

# A logical clock far from zero, advanced in exact binary fractions.
START = 1_000_000.0
STEPS = (0.25, 0.5, 1.0, 2.5)
DURATIONS = (0.1, 0.5, 1.5, 1.5)  # seconds a call took; 1.5 is slow when slow calls count
OUTCOMES = {
    "success": None,
    "failure": TransientError("503"),
    "ignore": PermanentError("422 client error"),
}
# Features the stateful runs must reach, besides each family's trip (checked after the
# runs, so a model that never leaves the closed state cannot pass).
GENERAL = {
    "half-open by time",
    "closed after trials",
    "re-opened by a trial failure",
    "busy: trial slots taken",
    "trial lease expired",
    "refused: open",
    "refused: forced open",
    "admitted: disabled",
    "admitted: shadow while open",
    "transition in shadow mode",
}


def unique_prefix() -> str:
    return "cbm" + uuid.uuid4().hex[:10]


# Policy families, each drawn around one way to trip; the rest varies within a family.
FAMILIES = {
    "consecutive failures": {"failure_threshold": [2, 3], "minimum_requests": [1]},
    "failure rate (count window)": {
        "failure_rate_threshold": [0.5, 0.75],
        "window_size": [3, 5],
        "minimum_requests": [1, 3],
    },
    "failure rate (time window)": {
        "failure_rate_threshold": [0.5, 0.75],
        "window_type": ["time"],
        "window_size": [4.0, 8.0],
        "minimum_requests": [1, 3],
    },
    "slow-call rate": {
        "slow_call_seconds": [1.0],
        "slow_call_rate_threshold": [0.5, 1.0],
        "window_type": ["count", "time"],
        "window_size": [4],
        "minimum_requests": [1, 3],
    },
}
# Every rule at once, in any combination (the first that holds names the reason).
MIXED = {
    "failure_threshold": [0, 2, 3],
    "failure_rate_threshold": [0.0, 0.5, 0.75],
    "window_type": ["count", "time"],
    "window_size": [3, 4.0],
    "minimum_requests": [1, 3],
    "slow_call_seconds": [0.0, 1.0],
    "slow_call_rate_threshold": [0.5, 1.0],
}


def breaker_configs(family: str) -> st.SearchStrategy[BreakerConfig]:
    """Policies of one family (its trip rule on, the others off) or mixed ones."""
    choices: dict[str, list[Any]] = {
        "failure_threshold": [0],
        "failure_rate_threshold": [0.0],
        "window_type": ["count"],
        "window_size": [3],
        "slow_call_seconds": [0.0],
        "slow_call_rate_threshold": [1.0],
        "recovery_timeout": [1.0, 3.0],
        "half_open_max_calls": [1, 2, 3],
        "success_threshold": [1, 2],
        "trial_lease_seconds": [1.5, 4.0],
        **FAMILIES.get(family, MIXED),
    }
    return st.builds(BreakerConfig, **{k: st.sampled_from(v) for k, v in choices.items()})


@dataclass
class BreakerModel:
    """What one breaker should be, written as plainly as possible."""

    cfg: BreakerConfig
    seen: set[str]
    state: str = "closed"
    mode: str = "normal"
    open_until: float = 0.0
    consec: int = 0
    half_ok: int = 0
    calls: list[tuple[float, bool, bool]] = field(default_factory=list)  # at, failed, slow
    trials: dict[str, float] = field(default_factory=dict)  # owner -> lease expiry
    events: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    @property
    def trial_calls(self) -> int:
        return max(self.cfg.half_open_max_calls, self.cfg.success_threshold)

    def transition(self, now: float, to: str, reason: str) -> None:
        self.events.append((self.state, to, reason, self.mode, f"{now:.6f}"))
        if self.mode == "shadow":
            self.seen.add("transition in shadow mode")
        self.state = to
        self.half_ok = 0
        self.trials.clear()
        if to == "open":
            self.open_until = now + self.cfg.recovery_timeout
        elif to == "closed":
            self.consec = 0
            self.calls.clear()

    def tick(self, now: float) -> None:
        """Time-based transitions: open -> half-open once the recovery timeout elapsed."""
        if self.state == "open" and now >= self.open_until:
            self.transition(now, "half_open", "recovery timeout elapsed")
            self.seen.add("half-open by time")

    def admit(self, now: float, owner: str) -> tuple[str | None, float]:
        """(None, 0) when admitted, else ('open' | 'busy', seconds to wait)."""
        self.tick(now)
        if self.mode == "disabled":
            self.seen.add("admitted: disabled")
            return None, 0.0
        verdict: str | None = None
        wait = 0.0
        if self.mode == "forced_open":
            verdict, wait = "open", self.cfg.recovery_timeout
        elif self.state == "open":
            verdict, wait = "open", max(self.open_until - now, 0.001)
        elif self.state == "half_open":
            for owner_, until in list(self.trials.items()):
                if until <= now:
                    del self.trials[owner_]
                    self.seen.add("trial lease expired")
            # half_open_max_calls trials per half-open spell (successes keep their place),
            # never fewer than success_threshold or the breaker could not close.
            if len(self.trials) + self.half_ok < self.trial_calls:
                verdict = "trial"
            else:
                verdict, wait = "busy", max(min(self.trials.values()) - now, 0.05)
        if verdict == "trial":
            self.trials[owner] = now + self.cfg.trial_lease_seconds
            return None, 0.0
        if self.mode == "shadow":
            if verdict == "open":
                self.seen.add("admitted: shadow while open")
            return None, 0.0
        if verdict == "busy":
            self.seen.add("busy: trial slots taken")
        elif verdict == "open":
            self.seen.add("refused: forced open" if self.mode == "forced_open" else "refused: open")
        return verdict, wait

    def window(self, now: float) -> tuple[int, int, int]:
        if self.cfg.window_type == "count":
            recent = self.calls[-int(self.cfg.window_size) :]
        else:
            recent = [c for c in self.calls if math.floor(c[0]) > now - self.cfg.window_size]
        self.calls = recent
        return len(recent), sum(c[1] for c in recent), sum(c[2] for c in recent)

    def record(self, now: float, owner: str, outcome: str, duration: float) -> str:
        self.tick(now)
        if self.mode == "disabled":
            return self.state
        trial = self.trials.pop(owner, None) is not None
        if outcome == "ignore":
            return self.state
        failed = outcome == "failure"
        slow = self.cfg.slow_call_seconds > 0 and duration >= self.cfg.slow_call_seconds
        if self.state == "half_open":
            if not trial:
                return self.state
            if failed:
                self.transition(now, "open", "trial call failed")
                self.seen.add("re-opened by a trial failure")
                return self.state
            self.half_ok += 1
            if self.half_ok >= self.cfg.success_threshold:
                self.transition(now, "closed", "trial calls succeeded")
                self.seen.add("closed after trials")
            return self.state
        if self.state != "closed":
            return self.state
        self.consec = self.consec + 1 if failed else 0
        self.calls.append((now, failed, slow))
        calls, failures, slows = self.window(now)
        cfg = self.cfg
        reason = None
        if cfg.failure_threshold > 0 and self.consec >= cfg.failure_threshold:
            reason, feature = f"{self.consec} consecutive failures", "consecutive failures"
        elif calls >= cfg.minimum_requests and calls > 0:
            if cfg.failure_rate_threshold > 0 and failures / calls >= cfg.failure_rate_threshold:
                reason = f"failure rate {failures / calls:.2f} over {calls} calls"
                feature = f"failure rate ({cfg.window_type} window)"
            elif (
                cfg.slow_call_seconds > 0
                and cfg.slow_call_rate_threshold > 0
                and slows / calls >= cfg.slow_call_rate_threshold
            ):
                reason = f"slow-call rate {slows / calls:.2f} over {calls} calls"
                feature = "slow-call rate"
        if reason:
            self.transition(now, "open", reason)
            self.seen.add(f"trip: {feature}")
        return self.state

    def reset(self) -> None:
        if self.state != "closed":
            self.events.append((self.state, "closed", "reset", self.mode, ""))
        self.state, self.consec, self.half_ok = "closed", 0, 0
        self.calls.clear()
        self.trials.clear()


class BreakerMachine(RuleBasedStateMachine):
    """One breaker driven through admissions, outcomes, time, modes and resets."""

    redis_url = ""
    family = ""
    seen: set[str] = set()
    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.store = Store(self.redis_url, unique_prefix())
        self.now = START
        self.issued = 0

    def teardown(self) -> None:
        delete_prefix(self.redis_url, self.store.keys.prefix)
        self.store.close()

    @initialize(data=st.data())
    def configure(self, data: st.DataObject) -> None:
        config = data.draw(breaker_configs(self.family), label="config")
        self.breaker = CircuitBreaker("dep", self.store, config)
        self.model = BreakerModel(config, self.seen)

    @rule(target=calls)
    def admit(self) -> Any:
        self.issued += 1
        owner = f"call-{self.issued}"
        verdict, wait = self.model.admit(self.now, owner)
        try:
            self.breaker.admit(owner, now=self.now)
        except CircuitBreakerError as exc:
            assert (exc.reason, exc.retry_after) == (verdict, pytest.approx(wait, abs=1e-6))
            return multiple()
        assert verdict is None
        return owner

    def likely_outcomes(self) -> st.SearchStrategy[str]:
        """Trials mostly succeed (so the breaker can close), other calls mostly fail."""
        likely = "success" if self.model.state == "half_open" else "failure"
        return st.sampled_from([likely, likely, *sorted(OUTCOMES)])

    @rule(owner=consumes(calls), data=st.data(), duration=st.sampled_from(DURATIONS))
    def finish(self, owner: str, data: st.DataObject, duration: float) -> None:
        """A call in flight finishes."""
        self.record(owner, data.draw(self.likely_outcomes()), duration)

    def record(self, owner: str, outcome: str, duration: float) -> None:
        expected = self.model.record(self.now, owner, outcome, duration)
        assert self.breaker.record(owner, OUTCOMES[outcome], duration, now=self.now) == expected

    @rule(data=st.data(), duration=st.sampled_from(DURATIONS))
    def call(self, data: st.DataObject, duration: float) -> None:
        """A call admitted and finished at once (the common case)."""
        outcome = data.draw(self.likely_outcomes())
        owner = self.admit()
        if isinstance(owner, str):
            self.record(owner, outcome, duration)

    @precondition(lambda self: hasattr(self, "model") and self.model.state == "closed")
    @rule()
    def fail_until_open(self) -> None:
        """An outage: slow failing calls until the breaker opens (or stops admitting)."""
        for _ in range(8):
            owner = self.admit()
            if not isinstance(owner, str):
                break
            self.record(owner, "failure", max(DURATIONS))
            if self.model.state != "closed":
                break

    @precondition(lambda self: hasattr(self, "model") and self.model.state == "open")
    @rule()
    def wait_for_recovery(self) -> None:
        self.now = max(self.now, self.model.open_until)

    @precondition(lambda self: hasattr(self, "model") and self.model.state == "half_open")
    @rule(target=calls)
    def crowd_the_half_open_breaker(self) -> Any:
        """More callers than trial slots arrive at once; they stay in flight."""
        owners = [self.admit() for _ in range(self.model.trial_calls + 1)]
        return multiple(*(o for o in owners if isinstance(o, str)))

    @precondition(lambda self: hasattr(self, "model") and self.model.trials)
    @rule(target=calls)
    def let_a_trial_lease_lapse(self) -> Any:
        """A trial's worker died: once its lease runs out, a newcomer may take the place."""
        self.now = max(self.now, min(self.model.trials.values()))
        return self.admit()

    @rule(seconds=st.sampled_from(STEPS))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    @rule(mode=st.sampled_from([BreakerMode.NORMAL] * 4 + list(BreakerMode)[1:]))
    def set_mode(self, mode: BreakerMode) -> None:
        self.breaker.set_mode(mode)
        self.model.mode = str(mode)

    @rule()
    def snapshot(self) -> None:
        self.model.tick(self.now)
        snap = self.breaker.snapshot(now=self.now)
        assert (snap["state"], snap["mode"]) == (self.model.state, self.model.mode)
        assert snap["open_until"] == (self.model.open_until or None)

    @rule()
    def reset(self) -> None:
        self.breaker.reset()
        self.model.reset()

    @invariant()
    def redis_holds_the_models_state(self) -> None:
        if not hasattr(self, "model"):
            return
        h, _w, t, e = self.breaker.keys
        client = self.store.client
        raw = client.hgetall(h)
        m = self.model
        assert raw.get("state", "closed") == m.state
        assert raw.get("mode", "normal") == m.mode
        assert int(raw.get("consec", 0)) == m.consec
        assert int(raw.get("half_ok", 0)) == m.half_ok
        assert float(raw.get("open_until", 0)) == m.open_until
        assert dict(client.zrange(t, 0, -1, withscores=True)) == m.trials
        entries = [f for _id, f in client.xrange(e)]
        assert all(f["breaker"] == "dep" for f in entries)
        # reset() takes no `now`: its transition is stamped with Redis TIME.
        assert [
            (f["from"], f["to"], f["reason"], f["mode"], "" if f["reason"] == "reset" else f["at"])
            for f in entries
        ] == m.events


def test_the_breaker_follows_the_reference_model(redis_url: str) -> None:
    seen: set[str] = set()
    for family in [*FAMILIES, "mixed"]:
        machine = type(
            "RedisBreakerMachine",
            (BreakerMachine,),
            {"redis_url": redis_url, "family": family, "seen": seen},
        )
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=40,
                stateful_step_count=50,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        assert family == "mixed" or f"trip: {family}" in seen
    assert GENERAL - seen == set()


# -- examples ----------------------------------------------------------------------------

QUICK = BreakerConfig(
    failure_threshold=2,
    recovery_timeout=5.0,
    half_open_max_calls=1,
    success_threshold=1,
    trial_lease_seconds=10.0,
)


@pytest.fixture
def breaker(bare_store: Store) -> CircuitBreaker:
    return CircuitBreaker("svc", bare_store, QUICK)


def events(breaker: CircuitBreaker) -> list[tuple[str, str, str]]:
    stream = breaker.keys[3]
    return [(f["from"], f["to"], f["reason"]) for _id, f in breaker.store.client.xrange(stream)]


def fail(breaker: CircuitBreaker, now: float, owner: str = "x") -> str:
    breaker.admit(owner, now=now)
    return breaker.record(owner, TransientError("503"), 0.01, now=now)


def test_each_transition_appends_exactly_one_event_including_half_open_by_time(
    breaker: CircuitBreaker,
) -> None:
    assert fail(breaker, START) == "closed"
    assert events(breaker) == []
    assert fail(breaker, START + 1) == "open"
    assert events(breaker) == [("closed", "open", "2 consecutive failures")]
    # Nobody calls while it is open; the first reader after the timeout moves it, once.
    assert breaker.snapshot(now=START + 5.5)["state"] == "open"
    assert breaker.snapshot(now=START + 6.5)["state"] == "half_open"
    assert breaker.snapshot(now=START + 6.6)["state"] == "half_open"
    breaker.admit("trial-1", now=START + 6.7)
    with pytest.raises(CircuitBreakerError, match="busy"):
        breaker.admit("trial-2", now=START + 6.7)
    assert events(breaker)[1:] == [("open", "half_open", "recovery timeout elapsed")]
    assert breaker.record("trial-1", TransientError("503"), 0.01, now=START + 7) == "open"
    assert breaker.snapshot(now=START + 12)["state"] == "half_open"
    breaker.admit("trial-3", now=START + 12)
    assert breaker.record("trial-3", None, 0.01, now=START + 12.5) == "closed"
    assert events(breaker) == [
        ("closed", "open", "2 consecutive failures"),
        ("open", "half_open", "recovery timeout elapsed"),
        ("half_open", "open", "trial call failed"),
        ("open", "half_open", "recovery timeout elapsed"),
        ("half_open", "closed", "trial calls succeeded"),
    ]
    stamps = [f["at"] for _id, f in breaker.store.client.xrange(breaker.keys[3])]
    assert stamps == [f"{START + s:.6f}" for s in (1, 6.5, 7, 12, 12.5)]


def test_reset_closes_an_open_breaker_forgets_its_window_and_records_the_transition(
    breaker: CircuitBreaker,
) -> None:
    fail(breaker, START)
    fail(breaker, START)
    assert breaker.snapshot(now=START)["state"] == "open"
    breaker.reset()
    assert breaker.snapshot(now=START)["state"] == "closed"
    assert events(breaker) == [
        ("closed", "open", "2 consecutive failures"),
        ("open", "closed", "reset"),
    ]
    breaker.admit("after-reset", now=START)  # admitted at once
    # The consecutive count starts over: one more failure does not trip it.
    assert fail(breaker, START) == "closed"
    breaker.reset()  # closing a closed breaker is no transition
    assert len(events(breaker)) == 2


def test_set_mode_forces_open_disables_or_shadows_the_breaker_fleet_wide(
    breaker: CircuitBreaker, bare_store: Store, second_store: Store
) -> None:
    other_process = CircuitBreaker("svc", second_store, QUICK)
    breaker.set_mode(BreakerMode.FORCED_OPEN)
    with pytest.raises(CircuitBreakerError) as refused:
        other_process.admit("a", now=START)
    assert (refused.value.reason, refused.value.retry_after) == ("open", 5.0)
    assert other_process.snapshot(now=START)["mode"] == "forced_open"
    breaker.set_mode(BreakerMode.DISABLED)
    for i in range(3):
        assert fail(other_process, START, f"d{i}") == "closed"  # nothing recorded
    breaker.set_mode(BreakerMode.SHADOW)
    fail(other_process, START, "s1")
    assert fail(other_process, START, "s2") == "open"  # still transitions ...
    other_process.admit("s3", now=START)  # ... but never rejects
    breaker.set_mode(BreakerMode.NORMAL)
    with pytest.raises(CircuitBreakerError, match="is open"):
        other_process.admit("n1", now=START)
    modes = [f["mode"] for _id, f in bare_store.client.xrange(breaker.keys[3])]
    assert modes == ["shadow"]  # the transition is recorded with the mode it happened in


def test_client_errors_and_store_outages_are_ignored_by_default() -> None:
    config = BreakerConfig()
    assert config.classify(None) == "success"
    assert config.classify(TransientError("503")) == "failure"
    assert config.classify(RuntimeError("boom")) == "failure"
    assert config.classify(PermanentError("404 not found")) == "ignore"
    assert config.classify(IdempotencyConflict("other args")) == "ignore"  # a PermanentError
    assert config.classify(BackendUnavailable("redis down")) == "ignore"
    assert config.classify(KeyboardInterrupt()) == "ignore"  # not an Exception
    narrow = BreakerConfig(record_on=(TransientError,), ignore_on=())
    assert narrow.classify(RuntimeError("boom")) == "ignore"
    assert narrow.classify(PermanentError("400")) == "ignore"
    assert narrow.classify(TransientError("503")) == "failure"


def test_a_client_error_never_trips_the_breaker(breaker: CircuitBreaker) -> None:
    calls = Counter[str]()

    def rejected_by_the_provider() -> None:
        calls["made"] += 1
        raise PermanentError("422 unprocessable")

    for _ in range(5):
        with pytest.raises(PermanentError):
            breaker.call(rejected_by_the_provider)
    assert calls["made"] == 5
    assert breaker.state is CircuitState.CLOSED
    assert events(breaker) == []


class Downstream:
    """Counts calls; fails while ``failing``."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = True

    def sync(self, value: int) -> int:
        self.calls += 1
        if self.failing:
            raise TransientError("503")
        return value * 2

    async def coro(self, value: int) -> int:
        await asyncio.sleep(0)
        return self.sync(value)


@pytest.fixture
def downstream() -> Downstream:
    return Downstream()


def expect_open_after_two_failures(attempt: Any, downstream: Downstream) -> None:
    for _ in range(2):
        with pytest.raises(TransientError):
            attempt()
    with pytest.raises(CircuitBreakerError) as refused:
        attempt()
    assert downstream.calls == 2  # the third call never reached the function
    assert refused.value.reason == "open"
    assert 0 < refused.value.retry_after <= QUICK.recovery_timeout


def test_call_opens_after_two_failures_and_refuses_the_third_without_calling(
    breaker: CircuitBreaker, downstream: Downstream
) -> None:
    expect_open_after_two_failures(lambda: breaker.call(downstream.sync, 1), downstream)
    assert breaker.state is CircuitState.OPEN


def test_call_async_opens_after_two_failures_and_refuses_the_third_without_calling(
    breaker: CircuitBreaker, downstream: Downstream
) -> None:
    expect_open_after_two_failures(
        lambda: asyncio.run(breaker.call_async(downstream.coro, 1)), downstream
    )


def test_the_decorator_guards_sync_functions(
    breaker: CircuitBreaker, downstream: Downstream
) -> None:
    @breaker
    def charge(value: int) -> int:
        return downstream.sync(value)

    downstream.failing = False
    assert charge(21) == 42
    downstream.failing = True
    downstream.calls = 0
    expect_open_after_two_failures(lambda: charge(1), downstream)
    assert charge.__name__ == "charge"


def test_the_decorator_guards_async_functions(
    breaker: CircuitBreaker, downstream: Downstream
) -> None:
    @breaker
    async def charge(value: int) -> int:
        return await downstream.coro(value)

    assert asyncio.iscoroutinefunction(charge)
    downstream.failing = False
    assert asyncio.run(charge(21)) == 42
    downstream.failing = True
    downstream.calls = 0
    expect_open_after_two_failures(lambda: asyncio.run(charge(1)), downstream)


def test_the_guard_context_manager_records_each_block(
    breaker: CircuitBreaker, downstream: Downstream
) -> None:
    def attempt() -> None:
        with breaker.guard():
            downstream.sync(1)

    expect_open_after_two_failures(attempt, downstream)
