"""RetryPolicy: the delay math (property and exact-value tests), decide(), and tenacity wiring.

Pure logic: no Redis, no clock, no sleeping (every sleep is injected and recorded).
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tenacity import Retrying
from tenacity.wait import wait_fixed

from reliability.errors import (
    ConfigurationError,
    IdempotencyConflict,
    PermanentError,
    TransientError,
)
from reliability.retry import JITTERS, STRATEGIES, RetryPolicy, WaitFibonacci

GROWING = ("exponential", "linear", "fibonacci", "fixed")
seconds = st.floats(min_value=0.0, max_value=1_000.0, allow_nan=False)
attempts = st.integers(min_value=1, max_value=10_000)
previous_delays = st.none() | seconds
rngs = st.randoms(use_true_random=False)


@st.composite
def policies(
    draw: st.DrawFn, /, strategies: tuple[str, ...] = STRATEGIES, **fixed: object
) -> RetryPolicy:
    """Any valid policy with a strategy from ``strategies``; ``fixed`` pins other fields."""
    base_delay = draw(st.floats(min_value=0.0, max_value=60.0))
    options: dict[str, object] = {
        "strategy": draw(st.sampled_from(strategies)),
        "jitter": draw(st.sampled_from(JITTERS)),
        "base_delay": base_delay,
        "max_delay": draw(st.floats(min_value=base_delay, max_value=600.0)),
        "multiplier": draw(st.floats(min_value=1.0, max_value=10.0)),
        "max_attempts": draw(st.integers(min_value=1, max_value=20)),
    }
    options.update(fixed)
    return RetryPolicy(**options)  # type: ignore[arg-type]


class Recorder:
    """An injected sleep that records instead of sleeping."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


class Flaky:
    """A callable that raises each of ``errors`` in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


# -- delay math: properties --


@given(policies(), attempts, previous_delays, rngs)
def test_every_delay_stays_between_zero_and_max_delay(
    policy: RetryPolicy, attempt: int, previous: float | None, rng: random.Random
) -> None:
    assert 0.0 <= policy.base(attempt, previous, rng) <= policy.max_delay
    assert 0.0 <= policy.delay(attempt, previous, rng) <= policy.max_delay


@given(policies(GROWING, jitter="none"), attempts)
def test_unjittered_delays_never_shrink_as_attempts_grow(policy: RetryPolicy, attempt: int) -> None:
    assert policy.delay(attempt) == policy.base(attempt)
    assert policy.base(attempt) <= policy.base(attempt + 1)


@given(policies(GROWING, jitter="full"), attempts, rngs)
def test_full_jitter_stays_between_zero_and_the_base_delay(
    policy: RetryPolicy, attempt: int, rng: random.Random
) -> None:
    assert 0.0 <= policy.delay(attempt, rng=rng) <= policy.base(attempt)


@given(policies(GROWING, jitter="equal"), attempts, rngs)
def test_equal_jitter_stays_between_half_and_all_of_the_base_delay(
    policy: RetryPolicy, attempt: int, rng: random.Random
) -> None:
    base = policy.base(attempt)
    assert base / 2 <= policy.delay(attempt, rng=rng) <= base


@given(policies(strategy="decorrelated"), attempts, previous_delays, rngs)
def test_decorrelated_delays_stay_between_base_delay_and_max_delay(
    policy: RetryPolicy, attempt: int, previous: float | None, rng: random.Random
) -> None:
    assert policy.base_delay <= policy.delay(attempt, previous, rng) <= policy.max_delay


@given(policies(), rngs)
def test_decide_gives_up_exactly_at_max_attempts(policy: RetryPolicy, rng: random.Random) -> None:
    for attempt in range(1, policy.max_attempts + 3):
        decision = policy.decide(attempt, TransientError("503"), rng=rng)
        assert (decision is None) == (attempt >= policy.max_attempts)


@given(policies(max_attempts=10), st.integers(min_value=1, max_value=9), rngs)
def test_decide_gives_up_at_once_on_permanent_and_unlisted_errors(
    policy: RetryPolicy, attempt: int, rng: random.Random
) -> None:
    assert policy.decide(attempt, PermanentError("400"), rng=rng) is None
    assert policy.decide(attempt, IdempotencyConflict("other args"), rng=rng) is None
    only_transient = policy.replace(retry_on=(TransientError,))
    assert only_transient.decide(attempt, ValueError("bad"), rng=rng) is None
    assert only_transient.decide(attempt, TransientError(), rng=rng) is not None


@given(policies(GROWING, jitter="none", max_attempts=10), st.integers(1, 9), seconds)
def test_decide_waits_at_least_the_retry_after_hint_even_past_max_delay(
    policy: RetryPolicy, attempt: int, hint: float
) -> None:
    decision = policy.decide(attempt, TransientError("429", retry_after=hint))
    assert decision == max(policy.base(attempt), hint)


@given(policies(max_attempts=10), st.integers(1, 9), seconds, seconds, previous_delays, rngs)
def test_decide_never_schedules_a_retry_past_max_elapsed(
    policy: RetryPolicy,
    attempt: int,
    max_elapsed: float,
    elapsed: float,
    previous: float | None,
    rng: random.Random,
) -> None:
    policy = policy.replace(max_elapsed=max_elapsed)
    decision = policy.decide(attempt, TransientError(), elapsed, previous, rng)
    assert decision is None or elapsed + decision <= max_elapsed


@given(policies(GROWING, jitter="none", max_attempts=10), st.integers(1, 9), seconds, seconds)
def test_decide_gives_up_exactly_when_the_next_wait_would_end_past_max_elapsed(
    policy: RetryPolicy, attempt: int, max_elapsed: float, elapsed: float
) -> None:
    policy = policy.replace(max_elapsed=max_elapsed)
    decision = policy.decide(attempt, TransientError(), elapsed)
    assert (decision is None) == (elapsed + policy.base(attempt) > max_elapsed)


# -- delay math: exact values --


def test_exponential_doubles_from_the_base_delay() -> None:
    policy = RetryPolicy(base_delay=1, multiplier=2, jitter="none")
    assert policy.schedule() == [1, 2, 4, 8]


def test_fibonacci_follows_the_fibonacci_numbers() -> None:
    policy = RetryPolicy(strategy="fibonacci", jitter="none", max_attempts=6)
    assert policy.schedule() == [1, 1, 2, 3, 5]


def test_linear_grows_by_the_base_delay_per_attempt() -> None:
    assert RetryPolicy(strategy="linear", jitter="none", max_attempts=4).schedule() == [1, 2, 3]


def test_fixed_repeats_the_base_delay() -> None:
    assert RetryPolicy(strategy="fixed", base_delay=2.5, jitter="none").schedule() == [2.5] * 4


def test_delays_stop_growing_at_max_delay() -> None:
    policy = RetryPolicy(max_delay=5, jitter="none", max_attempts=6)
    assert policy.schedule() == [1, 2, 4, 5, 5]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("base_delay", [0.0, 1e-300, 1.0])
def test_huge_attempt_numbers_do_not_overflow(strategy: str, base_delay: float) -> None:
    policy = RetryPolicy(strategy=strategy, base_delay=base_delay, multiplier=10)  # type: ignore[arg-type]
    for attempt in (10**3, 10**9, 10**18):
        delay = policy.delay(attempt, rng=random.Random(0))
        assert delay == 0.0 if base_delay == 0 else 0.0 < delay <= policy.max_delay


def test_decorrelated_draws_between_base_delay_and_three_times_the_previous_delay() -> None:
    policy = RetryPolicy(strategy="decorrelated", base_delay=1, max_delay=100)
    expected = random.Random(7).uniform(1.0, 6.0)
    assert policy.base(3, previous_delay=2.0, rng=random.Random(7)) == expected
    assert policy.delay(3, previous_delay=2.0, rng=random.Random(7)) == expected  # no extra jitter


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        RetryPolicy().delay(0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"base_delay": -1}, "base_delay"),
        ({"max_delay": -1, "base_delay": 0}, "max_delay"),
        ({"max_delay": float("nan")}, "max_delay"),
        ({"base_delay": 10, "max_delay": 5}, "max_delay"),
        ({"max_attempts": True}, "max_attempts"),
        ({"give_up_on": (PermanentError, "x")}, "give_up_on"),
        ({"max_elapsed": -0.5}, "max_elapsed"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"strategy": "quadratic"}, "strategy"),
        ({"jitter": "some"}, "jitter"),
        ({"retry_on": ValueError}, "retry_on"),
    ],
)
def test_invalid_settings_raise_configuration_error_naming_the_field(
    changes: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigurationError, match=field):
        RetryPolicy(**changes)  # type: ignore[arg-type]


def test_replace_validates_the_new_settings() -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy().replace(max_attempts=0)
    assert RetryPolicy().replace(strategy="linear").strategy == "linear"


# -- tenacity integration --


def test_a_function_failing_twice_is_called_three_times_with_the_policy_sleeps() -> None:
    policy = RetryPolicy(jitter="none")
    sleep, flaky = Recorder(), Flaky(TransientError("503"), TimeoutError())
    assert policy.retrying(sleep=sleep)(flaky) == "ok"
    assert flaky.calls == 3
    assert sleep.sleeps == policy.schedule()[:2]


def test_a_permanent_error_is_raised_without_a_retry() -> None:
    sleep, flaky = Recorder(), Flaky(PermanentError("400"))
    with pytest.raises(PermanentError):
        RetryPolicy().retrying(sleep=sleep)(flaky)
    assert (flaky.calls, sleep.sleeps) == (1, [])


def test_the_last_error_is_reraised_after_max_attempts() -> None:
    policy = RetryPolicy(jitter="none", max_attempts=4)
    sleep, flaky = Recorder(), Flaky(*(TransientError(str(n)) for n in range(5)))
    with pytest.raises(TransientError, match="3"):
        policy.retrying(sleep=sleep)(flaky)
    assert (flaky.calls, sleep.sleeps) == (4, policy.schedule())


def test_in_process_retries_honour_the_retry_after_hint() -> None:
    sleep, flaky = Recorder(), Flaky(TransientError("429", retry_after=7.5))
    RetryPolicy(jitter="none").retrying(sleep=sleep)(flaky)
    assert sleep.sleeps == [7.5]


def test_in_process_retries_stop_before_a_sleep_past_max_elapsed() -> None:
    policy = RetryPolicy(jitter="none", max_elapsed=2.5)  # sleeps 1 and 2 fit, then 4 would not
    sleep, flaky = Recorder(), Flaky(*(TransientError() for _ in range(5)))
    with pytest.raises(TransientError):
        policy.retrying(sleep=sleep)(flaky)
    assert (flaky.calls, sleep.sleeps) == (3, [1.0, 2.0])


def test_decorrelated_in_process_sleeps_follow_the_schedule_from_the_previous_sleep() -> None:
    policy = RetryPolicy(strategy="decorrelated", max_attempts=6)
    sleep, flaky = Recorder(), Flaky(*(TransientError() for _ in range(5)))
    assert policy.retrying(sleep=sleep, rng=random.Random(3))(flaky) == "ok"
    assert sleep.sleeps == policy.schedule(rng=random.Random(3))


def test_an_async_function_retries_with_async_retrying() -> None:
    policy, sleeps, calls = RetryPolicy(jitter="none"), [], []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("503")
        return "ok"

    assert asyncio.run(policy.async_retrying(sleep=record)(flaky)) == "ok"
    assert (len(calls), sleeps) == (3, policy.schedule()[:2])


def test_the_policy_decorates_sync_and_async_functions() -> None:
    policy = RetryPolicy(base_delay=0, max_delay=0)  # waits of 0 s: the default sleep is harmless
    flaky = Flaky(TransientError(), TransientError())
    assert policy(flaky)() == "ok"

    errors = [TransientError()]

    @policy
    async def async_flaky() -> str:
        if errors:
            raise errors.pop()
        return "ok"

    assert asyncio.run(async_flaky()) == "ok"
    assert flaky.calls == 3 and not errors


def test_custom_waits_compose_with_tenacity_operators() -> None:
    sleep, flaky = Recorder(), Flaky(TransientError(), TransientError(), TransientError())
    wait = WaitFibonacci(base_delay=1, max_delay=100) + wait_fixed(0.5)
    Retrying(sleep=sleep, wait=wait)(flaky)
    assert sleep.sleeps == [1.5, 1.5, 2.5]
    policy_wait = RetryPolicy(jitter="none").tenacity_wait() + wait_fixed(1)
    sleep = Recorder()
    Retrying(sleep=sleep, wait=policy_wait)(Flaky(TransientError(), TransientError()))
    assert sleep.sleeps == [2.0, 3.0]
