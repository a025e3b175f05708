"""In-process token buckets grant bursts up to capacity, then exactly ``rate`` tokens per second.

Pure tests: a fake clock and recorded sleeps (asyncio tasks sleep on a virtual clock that jumps
to the next wake-up once every task is asleep), so nothing here sleeps for real.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import threading
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from reliability.errors import ConfigurationError
from reliability.ratelimit.bucket import AsyncTokenBucket, LocalTokenBucket


class FakeClock:
    """For one thread: ``sleep`` records the duration and moves the clock by it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class VirtualTime:
    """For many asyncio tasks: time jumps to the earliest wake-up once every task is asleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, len(self.sleeps), future))
        await future

    async def run(self, *coroutines: Awaitable[object]) -> list[object]:
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        for _ in range(100_000):
            await asyncio.sleep(0)
            running = [t for t in tasks if not t.done()]
            if not running:
                return [t.result() for t in tasks]
            if len(self._sleepers) == len(running):  # everyone asleep: jump to the next wake-up
                wake, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, wake)
                future.set_result(None)
        raise AssertionError("virtual time did not settle")


def per_second(times: list[float]) -> dict[int, int]:
    return dict(sorted(Counter(math.floor(round(t, 9)) for t in times).items()))


def local_bucket(rate: float = 10.0, capacity: int = 5) -> tuple[LocalTokenBucket, FakeClock]:
    clock = FakeClock()
    return LocalTokenBucket(rate, capacity, clock=clock, sleep=clock.sleep), clock


def test_a_full_bucket_bursts_up_to_capacity_then_refills_at_rate() -> None:
    bucket, clock = local_bucket(rate=10.0, capacity=5)
    assert [bucket.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    clock.now = 0.1
    assert [bucket.try_acquire() for _ in range(2)] == [True, False]
    clock.now = 10.0  # a long pause refills only up to capacity
    assert bucket.available_tokens == 5.0
    assert [bucket.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    assert clock.sleeps == []


def test_acquire_sleeps_exactly_until_the_refill_covers_the_request() -> None:
    bucket, clock = local_bucket(rate=10.0, capacity=5)
    assert bucket.acquire(5) is True
    assert bucket.acquire(3) is True
    assert bucket.acquire(1) is True
    assert clock.sleeps == pytest.approx([0.3, 0.1])
    assert clock.now == pytest.approx(0.4)
    assert bucket.available_tokens == pytest.approx(0.0)


def test_a_weighted_acquire_takes_its_weight() -> None:
    bucket, _ = local_bucket(rate=10.0, capacity=5)
    assert bucket.acquire(tokens=4) is True
    assert bucket.available_tokens == pytest.approx(1.0)
    assert bucket.try_acquire(2) is False
    assert bucket.try_acquire(1) is True


def test_an_acquire_that_cannot_finish_in_time_returns_false_at_once_and_logs_it() -> None:
    vt = VirtualTime()
    bucket = AsyncTokenBucket(rate=10.0, capacity=5, clock=vt.clock, sleep=vt.sleep)

    async def scenario() -> list[bool]:
        await bucket.acquire(5)
        late = await bucket.acquire(5, timeout=0.2)  # needs 0.5 s
        in_time = await bucket.acquire(2, timeout=0.2)  # needs exactly 0.2 s
        return [late, in_time]

    with capture_logs() as logs:
        assert asyncio.run(vt.run(scenario())) == [[False, True]]
    assert vt.sleeps == pytest.approx([0.2])
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("tokens_acquired_immediate", "debug"),
        ("token_acquisition_timeout", "warning"),
        ("tokens_waiting", "info"),
        ("tokens_acquired_after_wait", "debug"),
    ]
    assert logs[1]["tokens"] == 5 and logs[1]["timeout_seconds"] == 0.2
    assert logs[1]["wait_seconds"] == pytest.approx(0.5)


def test_try_acquire_never_waits_and_logs_no_timeout() -> None:
    vt = VirtualTime()
    bucket = AsyncTokenBucket(rate=10.0, capacity=2, clock=vt.clock, sleep=vt.sleep)

    async def scenario() -> list[bool]:
        return [await bucket.try_acquire() for _ in range(3)]

    with capture_logs() as logs:
        assert asyncio.run(vt.run(scenario())) == [[True, True, False]]
    assert vt.sleeps == []
    assert [e["event"] for e in logs] == ["tokens_acquired_immediate"] * 2


def test_set_rate_credits_elapsed_time_at_the_old_rate_and_then_refills_at_the_new() -> None:
    bucket, clock = local_bucket(rate=10.0, capacity=5)
    bucket.acquire(5)
    clock.now = 0.2  # two tokens earned at 10/s
    bucket.set_rate(2.0)
    assert bucket.rate == 2.0
    assert bucket.available_tokens == pytest.approx(2.0)
    assert bucket.acquire(3) is True
    assert clock.sleeps == pytest.approx([0.5])  # the third token at 2/s


def test_reset_fills_the_bucket_and_the_async_bucket_follows_set_rate_too() -> None:
    vt = VirtualTime()
    bucket = AsyncTokenBucket(rate=10.0, capacity=5, clock=vt.clock, sleep=vt.sleep)

    async def scenario() -> tuple[float, float]:
        await bucket.acquire(5)
        await bucket.set_rate(1.0)
        await bucket.acquire(1)
        drained = bucket.available_tokens
        await bucket.reset()
        return drained, bucket.available_tokens

    assert asyncio.run(vt.run(scenario())) == [(0.0, 5.0)]
    assert vt.sleeps == pytest.approx([1.0])


def test_twenty_concurrent_acquirers_are_served_in_order_and_never_above_the_rate() -> None:
    vt = VirtualTime()
    bucket = AsyncTokenBucket(rate=10.0, capacity=5, clock=vt.clock, sleep=vt.sleep)
    grants: list[tuple[float, int]] = []
    asked: list[int] = []

    async def acquirer(index: int) -> None:
        for _ in range(3):
            asked.append(index)
            assert await bucket.acquire()
            grants.append((vt.now, index))

    asyncio.run(vt.run(*(acquirer(i) for i in range(20))))
    times = [t for t, _ in grants]
    assert len(grants) == 60
    assert times == sorted(times)
    assert [i for _, i in grants] == asked  # first come, first served
    # a burst of 5, then one token every 0.1 s: 14 in second 0, then 10 per second.
    assert per_second(times) == {0: 14, 1: 10, 2: 10, 3: 10, 4: 10, 5: 6}
    assert times[-1] == pytest.approx(5.5)


def test_a_cancelled_waiter_gives_its_tokens_back() -> None:
    vt = VirtualTime()
    bucket = AsyncTokenBucket(rate=10.0, capacity=5, clock=vt.clock, sleep=vt.sleep)

    async def scenario() -> bool:
        await bucket.acquire(5)
        waiter = asyncio.ensure_future(bucket.acquire(3))
        await asyncio.sleep(0)  # the waiter has reserved 3 tokens and sleeps
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return await bucket.try_acquire(1) is False and bucket.available_tokens == 0.0

    assert asyncio.run(scenario()) is True
    vt.now = 0.1
    assert bucket.available_tokens == pytest.approx(1.0)  # not -2: the 3 came back


def test_the_local_bucket_never_grants_more_than_capacity_across_threads() -> None:
    bucket, _ = local_bucket(rate=10.0, capacity=100)  # the clock never moves
    granted: list[bool] = []

    def worker() -> None:
        granted.extend(bucket.try_acquire() for _ in range(50))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert granted.count(True) == 100 and len(granted) == 400


@pytest.mark.parametrize(
    "make",
    [
        lambda: LocalTokenBucket(0, 5),
        lambda: LocalTokenBucket(-1.0, 5),
        lambda: LocalTokenBucket(math.nan, 5),
        lambda: LocalTokenBucket(math.inf, 5),
        lambda: LocalTokenBucket("10", 5),
        lambda: AsyncTokenBucket(10.0, 0),
        lambda: AsyncTokenBucket(10.0, 2.5),
        lambda: AsyncTokenBucket(10.0, True),
        lambda: local_bucket()[0].set_rate(0.0),
    ],
)
def test_invalid_rates_and_capacities_are_configuration_errors(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError):
        make()


@pytest.mark.parametrize(("tokens", "timeout"), [(0, None), (6, None), (1.0, None), (1, -0.1)])
def test_requests_outside_one_to_capacity_tokens_are_value_errors(
    tokens: int, timeout: float | None
) -> None:
    bucket, _ = local_bucket(capacity=5)
    with pytest.raises(ValueError, match="must be"):
        bucket.acquire(tokens, timeout=timeout)
    with pytest.raises(ValueError, match="must be"):
        asyncio.run(
            AsyncTokenBucket(10.0, 5).try_acquire(tokens)
            if timeout is None
            else AsyncTokenBucket(10.0, 5).acquire(tokens, timeout)
        )


def assert_within_bound(grants: list[tuple[float, int]], rate: float, capacity: int) -> None:
    """Tokens granted in any closed interval [a, b] <= capacity + rate * (b - a)."""
    grants = sorted(grants)
    for i, (start, _) in enumerate(grants):
        total = 0
        for end, tokens in grants[i:]:
            total += tokens
            assert total <= capacity + rate * (end - start) + 1e-6, (start, end, total)


requests = st.lists(
    st.tuples(
        st.floats(0, 3, allow_nan=False),  # arrival delay, seconds
        st.integers(1, 8),  # tokens (clamped to capacity)
        st.one_of(st.none(), st.just(0.0), st.floats(0, 2, allow_nan=False)),  # timeout
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(rate=st.floats(0.5, 50), capacity=st.integers(1, 8), plan=requests)
def test_concurrent_grants_over_any_interval_never_exceed_capacity_plus_rate_times_interval(
    rate: float, capacity: int, plan: list[tuple[float, int, float | None]]
) -> None:
    vt = VirtualTime()
    bucket = AsyncTokenBucket(rate, capacity, clock=vt.clock, sleep=vt.sleep)
    grants: list[tuple[float, int]] = []

    async def request(delay: float, tokens: int, timeout: float | None) -> None:
        await vt.sleep(delay)
        tokens = min(tokens, capacity)
        if await bucket.acquire(tokens, timeout=timeout):
            grants.append((vt.now, tokens))

    asyncio.run(vt.run(*(request(*r) for r in plan)))
    assert_within_bound(grants, rate, capacity)


@settings(max_examples=150, deadline=None)
@given(rate=st.floats(0.5, 50), capacity=st.integers(1, 8), plan=requests)
def test_sequential_local_grants_never_exceed_capacity_plus_rate_times_interval(
    rate: float, capacity: int, plan: list[tuple[float, int, float | None]]
) -> None:
    bucket, clock = local_bucket(rate, capacity)
    grants: list[tuple[float, int]] = []
    for delay, tokens, timeout in plan:
        clock.now += delay
        tokens = min(tokens, capacity)
        granted = bucket.try_acquire(tokens) if timeout == 0.0 else bucket.acquire(tokens, timeout)
        if granted:
            grants.append((clock.now, tokens))
    assert_within_bound(grants, rate, capacity)
