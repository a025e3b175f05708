"""The rate limiters' Lua against plain Python references, on a logical clock.

Real Redis, real scripts; ``now`` is passed to every call, never slept. Reservations
(a request that does not conform now is given its future slot) are exercised through
the admission fragment exactly as the pipeline assembles it; immediate decisions
through :class:`RateLimiter`. For every kind the admitted and reserved times must obey
the limit's promise over every interval, and match a brute-force reference. The
sliding window is also checked against the ``limits`` library's moving window.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import limits
import limits.storage.memory
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reliability import admission, ratelimit
from reliability.completion import COMPLETE
from reliability.ratelimit import RateLimit, RateLimiter
from reliability.ratelimit.guard import release_fragment
from reliability.scripts import Part
from reliability.store import Store
from tests.support.fleet import delete_prefix

START = 1_000_000.0  # logical clock origin; steps are exact binary fractions
TICK = 0.125
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def store(redis_url: str) -> Iterator[Store]:
    prefix = "rlm" + uuid.uuid4().hex[:10]
    store = Store(redis_url, prefix)
    yield store
    store.close()
    delete_prefix(redis_url, prefix)


def fresh(kind: str, **params: float) -> RateLimit:
    """A limit under a name no other example uses (so its keys start empty)."""
    return RateLimit(name=f"{kind}-{uuid.uuid4().hex[:8]}", kind=kind, **params)  # type: ignore[arg-type]


def admit(
    store: Store, limits_: Sequence[RateLimit], now: float, owner: str = "o", reserved: bool = False
) -> tuple[str, float]:
    """Run the admission fragment for ``limits_`` at ``now``, as the pipeline does
    (``reserved``: for a copy that was parked with its slot).

    Returns ('run', now), ('limit_delay', reserved time) or ('limit_busy', retry after).
    """
    keys, args = ratelimit.admission_args(store, "test.limited", limits_, owner, None, dict)
    script, all_keys, all_args = admission.layout(
        [Part(ratelimit.fragment(len(limits_), reserved), keys, args)],
        ledger=store.keys.ledger,
        ledger_max=1000,
        task_id="t1",
        name="test.limited",
        attempt=1,
        dlv_ttl_ms=60_000,
        now=now,
    )
    verdict = admission.parse(store.run(script.source, all_keys, all_args, "admission"))
    if verdict.runs:
        return "run", now
    if verdict.decision == "limit_delay":
        return "limit_delay", now + float(verdict.detail)
    assert verdict.decision == "limit_busy", verdict
    return "limit_busy", float(verdict.detail)


def arrivals() -> st.SearchStrategy[list[tuple[float, int]]]:
    """Request times (non-decreasing, on a 1/8 s grid) with their costs."""
    steps = st.lists(st.tuples(st.integers(0, 12), st.integers(1, 2)), min_size=1, max_size=30)
    return steps.map(
        lambda xs: [
            (START + TICK * sum(g for g, _ in xs[: i + 1]), c) for i, (_, c) in enumerate(xs)
        ]
    )


# -- reference models (brute force over candidate times) ---------------------------------


@dataclass
class GcraRef:
    rate: float
    burst: int
    tat: float = 0.0  # theoretical arrival time: the bucket is full again then

    def candidates(self, t: float, cost: int) -> list[float]:
        return [t, self.tat - (self.burst - cost) / self.rate]

    def conforms(self, x: float, cost: int) -> bool:
        tokens = self.burst - max(self.tat - x, 0.0) * self.rate
        return cost <= self.burst and tokens >= cost

    def commit(self, x: float, cost: int) -> None:
        self.tat = max(self.tat, x) + cost / self.rate


@dataclass
class SlidingRef:
    max_requests: int
    window: float
    log: list[float] = field(default_factory=list)  # admitted and reserved times, sorted
    now: float = 0.0  # the request's arrival: entries older than now - window are gone

    def earliest(self, t: float, cost: int) -> float:
        """ratelimit.lua's rule: free while every live entry (future ones included) plus
        this cost fits; else after the entry `cost` places before the newest `max`."""
        live = sorted(s for s in self.log if s > self.now - self.window)
        if len(live) + cost <= self.max_requests:
            return t
        return max(t, live[len(live) - self.max_requests + cost - 1] + self.window, live[-1])

    def candidates(self, t: float, cost: int) -> list[float]:
        return [t, self.earliest(t, cost)]

    def conforms(self, x: float, cost: int) -> bool:
        return self.earliest(x, cost) == x

    def commit(self, x: float, cost: int) -> None:
        self.log.extend([x] * cost)


@dataclass
class FixedRef:
    max_requests: int
    window: float
    used: Counter[int] = field(default_factory=Counter)

    def candidates(self, t: float, cost: int) -> list[float]:
        first = math.floor(t / self.window)
        return [t, *(k * self.window for k in range(first + 1, first + 2 + len(self.used)))]

    def conforms(self, x: float, cost: int) -> bool:
        return self.used[math.floor(x / self.window)] + cost <= self.max_requests

    def commit(self, x: float, cost: int) -> None:
        self.used[math.floor(x / self.window)] += cost


@dataclass
class StartGate:
    """Admissions actually made (started now, not reserved for later) never exceed the
    limit's most in any window (x - span, x], so reserved copies arriving late cannot
    overshoot it either (ratelimit.lua ``rl_gate``)."""

    span: float
    most: int
    starts: list[float] = field(default_factory=list)

    def candidates(self, t: float, cost: int) -> list[float]:
        return [s + self.span for s in self.starts]

    def conforms(self, x: float, cost: int) -> bool:
        return sum(1 for s in self.starts if s > x - self.span) + cost <= self.most

    def start(self, now: float, cost: int) -> None:
        self.starts.extend([now] * cost)


def gate_for(limit: RateLimit) -> StartGate:
    if limit.kind == "gcra":
        # GCRA's own most in a window of span: the burst, then one per 1/rate inside it.
        span = max(1.0, 1 / limit.rate)
        return StartGate(span, limit.burst + math.ceil(limit.rate * span) - 1)
    # Windows: at most max_requests starts in ANY window (for fixed ones too).
    return StartGate(limit.window_seconds, limit.max_requests)


Ref = GcraRef | SlidingRef | FixedRef | StartGate


def reference_time(refs: Sequence[Ref], t: float, cost: int) -> float | None:
    """The earliest time >= t at which every limit conforms (None: never)."""
    candidates = sorted({x for r in refs for x in r.candidates(t, cost) if x >= t})
    return next((x for x in candidates if all(r.conforms(x, cost) for r in refs)), None)


def ref_for(limit: RateLimit) -> Ref:
    if limit.kind == "gcra":
        return GcraRef(limit.rate, limit.burst)
    if limit.kind == "sliding":
        return SlidingRef(limit.max_requests, limit.window_seconds)
    return FixedRef(limit.max_requests, limit.window_seconds)


# -- what each kind promises, over every interval ----------------------------------------


def assert_gcra_promise(schedule: list[tuple[float, int]], rate: float, burst: int) -> None:
    """At most burst + rate * elapsed tokens over any closed interval [a, b]."""
    times = sorted(schedule)
    for i, (a, _) in enumerate(times):
        for b, _ in times[i:]:
            taken = sum(c for x, c in times if a <= x <= b)
            assert taken <= burst + rate * (b - a), (a, b, taken)


def assert_sliding_promise(
    schedule: list[tuple[float, int]], max_requests: int, window: float
) -> None:
    """At most max_requests in ANY window (x - window, x]: the worst ones end at a slot."""
    for end, _ in schedule:
        inside = sum(c for x, c in schedule if end - window < x <= end)
        assert inside <= max_requests, (end, inside)


def assert_fixed_promise(
    schedule: list[tuple[float, int]], max_requests: int, window: float
) -> None:
    per_window = Counter[int]()
    for x, c in schedule:
        per_window[math.floor(x / window)] += c
    assert max(per_window.values(), default=0) <= max_requests, per_window


def run_schedule(
    store: Store, limits_: Sequence[RateLimit], requests: list[tuple[float, int]]
) -> list[tuple[float, int]]:
    """Admit each request through the fragment; compare with the reference; the schedule."""
    refs = [ref_for(x) for x in limits_]
    gates = [gate_for(x) for x in limits_]
    schedule: list[tuple[float, int]] = []
    for i, (now, cost) in enumerate(requests):
        for r in refs:
            if isinstance(r, SlidingRef):
                r.now = now
        weighted = [replace(x, cost=cost) for x in limits_]
        verdict, at = admit(store, weighted, now, owner=f"r{i}")
        expected = reference_time([*refs, *gates], now, cost)
        assert expected is not None and verdict != "limit_busy", (verdict, at)
        assert at == pytest.approx(expected, abs=1e-6)
        assert verdict == ("run" if expected == now else "limit_delay")
        for r in refs:
            r.commit(expected, cost)
        if expected == now:  # reserved copies never come back here
            for g in gates:
                g.start(now, cost)
        schedule.append((at, cost))
    return schedule


# -- GCRA --------------------------------------------------------------------------------


@PROPERTY
@given(rate=st.sampled_from([1.0, 2.0, 4.0, 8.0]), burst=st.integers(1, 4), requests=arrivals())
def test_gcra_try_acquire_is_the_token_bucket_and_never_exceeds_burst_plus_rate(
    store: Store, rate: float, burst: int, requests: list[tuple[float, int]]
) -> None:
    limiter = RateLimiter(store, fresh("gcra", rate=rate, burst=burst))
    bucket = GcraRef(rate, burst)
    admitted = []
    for now, cost in requests:
        expected = bucket.conforms(now, cost)
        assert limiter.try_acquire(cost, now=now) == expected
        if expected:
            bucket.commit(now, cost)
            admitted.append((now, cost))
    assert_gcra_promise(admitted, rate, burst)


@PROPERTY
@given(rate=st.sampled_from([1.0, 2.0, 4.0, 8.0]), burst=st.integers(2, 4), requests=arrivals())
def test_gcra_reservations_keep_the_promise_and_match_the_reference(
    store: Store, rate: float, burst: int, requests: list[tuple[float, int]]
) -> None:
    schedule = run_schedule(store, [fresh("gcra", rate=rate, burst=burst)], requests)
    assert_gcra_promise(schedule, rate, burst)


def test_gcra_reserves_slots_spaced_exactly_one_over_rate_once_the_burst_is_spent(
    store: Store,
) -> None:
    limit = fresh("gcra", rate=4, burst=3)
    verdicts = [admit(store, [limit], START, owner=f"r{i}") for i in range(8)]
    assert [v for v, _ in verdicts] == ["run"] * 3 + ["limit_delay"] * 5
    assert [at - START for _, at in verdicts] == [0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.25]
    # A tenth of a second later the next free slot is still after the last reservation.
    assert admit(store, [limit], START + 0.1) == ("limit_delay", START + 1.5)


def test_gcra_at_a_fractional_rate_starts_every_request_that_keeps_to_its_schedule(
    store: Store,
) -> None:
    limit = fresh("gcra", rate=2.5, burst=1)
    verdicts = [admit(store, [limit], START + k * 0.4, owner=f"r{k}") for k in range(11)]
    assert [v for v, _ in verdicts] == ["run"] * 11  # 2.5 per second, not 2
    assert admit(store, [limit], START + 4.1)[0] == "limit_delay"


def test_reserved_copies_that_come_back_late_still_start_within_the_limit(store: Store) -> None:
    limit = fresh("gcra", rate=1, burst=1)
    assert admit(store, [limit], START, owner="a") == ("run", START)
    assert admit(store, [limit], START, owner="b") == ("limit_delay", START + 1)
    assert admit(store, [limit], START, owner="c") == ("limit_delay", START + 2)
    # Both copies are republished late and arrive together: one starts, one waits.
    assert admit(store, [limit], START + 2.5, owner="b", reserved=True) == ("run", START + 2.5)
    assert admit(store, [limit], START + 2.5, owner="c", reserved=True) == (
        "limit_delay",
        START + 3.5,
    )
    assert admit(store, [limit], START + 3.5, owner="c", reserved=True) == ("run", START + 3.5)


# -- sliding and fixed windows -----------------------------------------------------------


@PROPERTY
@given(max_requests=st.integers(2, 4), window=st.sampled_from([1.0, 2.0, 4.0]), requests=arrivals())
def test_the_sliding_window_never_admits_more_than_max_in_any_window(
    store: Store, max_requests: int, window: float, requests: list[tuple[float, int]]
) -> None:
    limit = fresh("sliding", max_requests=max_requests, window_seconds=window)
    schedule = run_schedule(store, [limit], requests)
    assert_sliding_promise(schedule, max_requests, window)


@PROPERTY
@given(max_requests=st.integers(2, 4), window=st.sampled_from([1.0, 2.0, 4.0]), requests=arrivals())
def test_the_fixed_window_never_admits_more_than_max_per_aligned_window(
    store: Store, max_requests: int, window: float, requests: list[tuple[float, int]]
) -> None:
    limit = fresh("fixed", max_requests=max_requests, window_seconds=window)
    schedule = run_schedule(store, [limit], requests)
    assert_fixed_promise(schedule, max_requests, window)


@PROPERTY
@given(kind=st.sampled_from(["gcra", "sliding", "fixed"]), requests=arrivals())
def test_a_request_costing_more_than_the_limit_holds_is_refused_not_an_error(
    store: Store, kind: str, requests: list[tuple[float, int]]
) -> None:
    limiter = RateLimiter(store, fresh(kind, rate=2, burst=2, max_requests=2))
    for now, _ in requests:
        assert limiter.try_acquire(3, now=now) is False
    assert limiter.try_acquire(2, now=requests[-1][0] + 100) is True


# -- concurrency -------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(1, 2)),
        st.tuples(st.just("release"), st.integers(0, 5)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.5])),
    ),
    min_size=1,
    max_size=40,
)


@PROPERTY
@given(limit=st.integers(1, 4), lease=st.sampled_from([1.0, 3.0]), ops=OPS)
def test_concurrency_never_exceeds_its_limit_and_a_lapsed_holder_frees_its_place(
    store: Store, limit: int, lease: float, ops: list[tuple[str, float]]
) -> None:
    base = fresh("concurrency", limit=limit, lease_seconds=lease)
    limiter = RateLimiter(store, base)
    holders: dict[str, tuple[float, int]] = {}  # owner -> (lease expiry, places)
    now = START
    for n, (op, arg) in enumerate(ops):
        live = {o: h for o, h in holders.items() if h[0] > now}
        if op == "acquire":
            cost = min(int(arg), limit)  # a cost above the limit is refused at declaration
            verdict, _ = admit(store, [replace(base, cost=cost)], now, owner=f"h{n}")
            fits = sum(c for _, c in live.values()) + cost <= limit
            assert verdict == ("run" if fits else "limit_busy")
            if fits:
                holders[f"h{n}"] = (now + lease, cost)
        elif op == "release" and live:
            owner = sorted(live)[int(arg) % len(live)]
            limiter.release(owner)
            del holders[owner]
        elif op == "advance":
            now += arg
        held = sum(c for until, c in holders.values() if until > now)
        assert held <= limit
        in_redis = store.client.zcount(limiter.keys[0], f"({now}", "+inf")
        assert in_redis == held


# -- several limits in one admission (global -> tenant -> task) ---------------------------

LIMIT_SHAPES = st.lists(
    st.one_of(
        st.builds(
            lambda r, b: ("gcra", {"rate": r, "burst": b}),
            st.sampled_from([1.0, 2.0, 4.0]),
            st.integers(2, 3),
        ),
        st.builds(
            lambda m, w: ("sliding", {"max_requests": m, "window_seconds": w}),
            st.integers(2, 4),
            st.sampled_from([1.0, 2.0]),
        ),
        st.builds(
            lambda m, w: ("fixed", {"max_requests": m, "window_seconds": w}),
            st.integers(2, 4),
            st.sampled_from([1.0, 2.0]),
        ),
    ),
    min_size=2,
    max_size=3,
)


@PROPERTY
@given(shapes=LIMIT_SHAPES, requests=arrivals())
def test_hierarchical_limits_reserve_the_earliest_time_every_limit_allows_for_all(
    store: Store, shapes: list[tuple[str, dict[str, float]]], requests: list[tuple[float, int]]
) -> None:
    limits_ = [fresh(kind, **params) for kind, params in shapes]
    schedule = run_schedule(store, limits_, requests)
    for limit in limits_:
        if limit.kind == "gcra":
            assert_gcra_promise(schedule, limit.rate, limit.burst)
        elif limit.kind == "sliding":
            assert_sliding_promise(schedule, limit.max_requests, limit.window_seconds)
        else:
            assert_fixed_promise(schedule, limit.max_requests, limit.window_seconds)


def dump(store: Store, limits_: Sequence[RateLimit]) -> dict[str, object]:
    """Every key the limits own, with its value (what a partial commit would change)."""
    out: dict[str, object] = {}
    for limit in limits_:
        base = ratelimit.limit_keys(store, limit, "-")[0]
        for key in sorted(store.client.scan_iter(match=f"{base}*")):
            kind = store.client.type(key)
            out[key] = (
                store.client.zrange(key, 0, -1, withscores=True)
                if kind == "zset"
                else store.client.get(key)
            )
    return out


def test_a_refusal_by_one_limit_commits_nothing_for_the_others(store: Store) -> None:
    gcra, sliding = fresh("gcra", rate=1, burst=1), fresh("sliding", max_requests=1)
    fixed, slots = fresh("fixed", max_requests=1, window_seconds=10), fresh("concurrency", limit=1)
    chain = [gcra, sliding, fixed, slots]
    assert admit(store, [fixed], START, owner="first") == ("run", START)
    assert admit(store, [slots], START, owner="holder") == ("run", START)
    before = dump(store, chain)
    assert admit(store, chain, START, owner="second")[0] == "limit_busy"
    assert dump(store, chain) == before
    # The fixed window's next window is the first time all agree on: all reserve it ...
    RateLimiter(store, slots).release("holder")
    assert admit(store, [gcra], START, owner="x") == ("run", START)
    assert admit(store, chain, START, owner="y") == ("limit_delay", START + 10)
    assert store.client.zrange(
        ratelimit.limit_keys(store, sliding, "-")[0], 0, -1, withscores=True
    ) == [(f"{START + 10:.6f}:y:1", START + 10)]
    assert float(store.client.get(ratelimit.limit_keys(store, gcra, "-")[0])) == START + 11
    fixed_key = ratelimit.limit_keys(store, fixed, "-")[0]
    assert store.client.get(f"{fixed_key}:{math.floor((START + 10) / 10)}") == "1"
    # ... except the concurrency place, which the copy takes when it runs.
    assert store.client.zrange(ratelimit.limit_keys(store, slots, "-")[0], 0, -1) == []


def test_a_parked_reservation_holds_no_concurrency_place_its_copy_takes_one_on_arrival(
    store: Store,
) -> None:
    pace, slots = fresh("gcra", rate=1, burst=1), fresh("concurrency", limit=1)
    places = ratelimit.limit_keys(store, slots, "-")[0]
    assert admit(store, [pace, slots], START, owner="first") == ("run", START)
    RateLimiter(store, slots).release("first")  # it finished
    # The next delivery is paced to START + 1: parked, it must not sit on the only place.
    assert admit(store, [pace, slots], START, owner="second") == ("limit_delay", START + 1)
    assert store.client.zrange(places, 0, -1) == []
    # Its copy (another delivery, so another owner) takes the place when it runs.
    assert admit(store, [pace, slots], START + 1, owner="second-copy", reserved=True) == (
        "run",
        START + 1,
    )
    assert store.client.zrange(places, 0, -1) == ["second-copy"]


def test_limits_that_keep_pushing_each_other_later_never_over_admit(store: Store) -> None:
    """Two fixed windows full on alternate seconds: no common free second for a while."""
    a = fresh("fixed", max_requests=1, window_seconds=1)
    b = fresh("fixed", max_requests=1, window_seconds=1)
    for second in range(0, 24, 2):
        assert RateLimiter(store, a).try_acquire(now=START + second)
        assert RateLimiter(store, b).try_acquire(now=START + second + 1)
    verdict, at = admit(store, [a, b], START, owner="late")
    if verdict != "limit_busy":  # a deeper search would find the first common free second
        assert (verdict, at) == ("limit_delay", START + 24)
    for limit in (a, b):
        key = ratelimit.limit_keys(store, limit, "-")[0]
        counts = [int(store.client.get(f"{key}:{math.floor(START) + s}") or 0) for s in range(26)]
        assert max(counts) <= 1, counts
        assert sum(counts) == 12 + (verdict != "limit_busy")  # refused: nothing reserved


# -- administration ----------------------------------------------------------------------


def test_set_rate_changes_the_limit_for_every_limiter_in_the_fleet(store: Store) -> None:
    limit = fresh("gcra", rate=1, burst=1)
    here, elsewhere = RateLimiter(store, limit), RateLimiter(store, limit)
    assert here.try_acquire(now=START)
    assert not elsewhere.try_acquire(now=START)
    here.set_rate(rate=1, burst=3)
    assert [elsewhere.try_acquire(now=START) for _ in range(3)] == [True, True, False]
    window = fresh("sliding", max_requests=1, window_seconds=60)
    RateLimiter(store, window).set_rate(max_requests=2)
    other = RateLimiter(store, window)
    assert [other.try_acquire(now=START) for _ in range(3)] == [True, True, False]
    assert store.client.hgetall(other.keys[1]) == {"p1": "2"}


def test_reset_refills_the_limit_and_forgets_runtime_overrides(store: Store) -> None:
    for limit in (
        fresh("gcra", rate=0.5, burst=2),
        fresh("sliding", max_requests=2, window_seconds=60),
        fresh("fixed", max_requests=2, window_seconds=60),
    ):
        limiter = RateLimiter(store, limit)
        limiter.set_rate(rate=0.5, burst=1, max_requests=1)
        assert [limiter.try_acquire(now=START) for _ in range(2)] == [True, False]
        limiter.reset()
        assert [limiter.try_acquire(now=START) for _ in range(3)] == [True, True, False]


def test_available_tokens_reports_what_is_left_now(store: Store) -> None:
    bucket = RateLimiter(store, fresh("gcra", rate=0.001, burst=5))
    assert bucket.available_tokens == 5
    assert bucket.try_acquire(2)  # on Redis time, as available_tokens reads it
    assert bucket.available_tokens == pytest.approx(3, abs=0.01)
    window = RateLimiter(store, fresh("sliding", max_requests=4, window_seconds=60))
    assert window.try_acquire(3)
    assert window.available_tokens == 1
    assert not window.try_acquire(2)
    assert window.available_tokens == 1
    slots = fresh("concurrency", limit=3)
    assert admit(store, [slots], store_time(store), owner="h1")[0] == "run"
    assert RateLimiter(store, slots).available_tokens == 2


def store_time(store: Store) -> float:
    seconds, micros = store.client.time()
    return seconds + micros / 1e6


def test_weighted_cost_takes_that_many_places(store: Store) -> None:
    bucket = RateLimiter(store, fresh("gcra", rate=1, burst=5))
    assert bucket.try_acquire(3, now=START)
    assert not bucket.try_acquire(3, now=START)
    assert bucket.try_acquire(2, now=START)
    assert bucket.try_acquire(1, now=START + 1)
    window = RateLimiter(store, fresh("fixed", max_requests=5, window_seconds=10))
    assert window.try_acquire(4, now=START)
    assert not window.try_acquire(2, now=START)
    assert window.try_acquire(1, now=START)
    slots = fresh("concurrency", limit=4)
    assert admit(store, [replace(slots, cost=3)], START, "a")[0] == "run"
    assert admit(store, [replace(slots, cost=2)], START, "b")[0] == ("limit_busy")
    assert admit(store, [slots], START, "c")[0] == "run"
    assert admit(store, [slots], START, "d")[0] == "limit_busy"
    RateLimiter(store, slots).release("a")
    assert admit(store, [replace(slots, cost=3)], START, "e")[0] == "run"
    # A task that finishes frees every place it held, in its completion script.
    key = ratelimit.limit_keys(store, slots, "-")[0]
    assert store.client.zcard(key) == 4
    k = store.keys
    dlv = k.delivery("test.limited", "t1", 0, "")
    tail = Part(release_fragment(1), [key], ["e"])
    script = COMPLETE.extended((tail.fragment,))
    keys, args = script.layout(
        {"leases": k.leases, "dlv": dlv, "ledger": k.ledger},
        {
            "result": "null",
            "result_ttl": 60,
            "dlv_ttl_ms": 60_000,
            "ledger_max": 1000,
            "task_id": "t1",
            "name": "test.limited",
            "attempt": 1,
            "budget_window": 60,
        },
        [tail],
        now=START,
    )
    store.run(script.source, keys, args, "completion")
    assert store.client.zrange(key, 0, -1) == ["c"]


# -- differential: the `limits` library's moving window ----------------------------------


@PROPERTY
@given(
    max_requests=st.integers(1, 5),
    window=st.sampled_from([1, 2, 5]),
    steps=st.lists(st.tuples(st.integers(0, 1500), st.integers(1, 3)), min_size=1, max_size=40),
)
def test_the_sliding_window_agrees_with_the_limits_librarys_moving_window(
    store: Store,
    monkeypatch_module: pytest.MonkeyPatch,
    max_requests: int,
    window: int,
    steps: list[tuple[int, int]],
) -> None:
    millis = list(itertools.accumulate(gap for gap, _ in steps))
    # Both count a request exactly `window` old differently (ours: out, theirs: in);
    # elsewhere they must agree. The boundary convention has its own test below.
    assume(not any(b - a == window * 1000 for a, b in itertools.combinations(millis, 2)))
    clock = SimpleNamespace(time=lambda: START)
    monkeypatch_module.setattr(limits.storage.memory, "time", clock)
    theirs = limits.strategies.MovingWindowRateLimiter(limits.storage.MemoryStorage())
    item = limits.RateLimitItemPerSecond(max_requests, window)
    ours = RateLimiter(store, fresh("sliding", max_requests=max_requests, window_seconds=window))
    for ms, (_, cost) in zip(millis, steps, strict=True):
        now = START + ms / 1000
        clock.time = lambda now=now: now
        assert ours.try_acquire(cost, now=now) == theirs.hit(item, "k", cost=cost), (ms, cost)


def test_at_the_exact_window_boundary_the_oldest_request_no_longer_counts(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SimpleNamespace(time=lambda: START)
    monkeypatch.setattr(limits.storage.memory, "time", clock)
    theirs = limits.strategies.MovingWindowRateLimiter(limits.storage.MemoryStorage())
    item = limits.RateLimitItemPerSecond(1, 1)
    ours = RateLimiter(store, fresh("sliding", max_requests=1, window_seconds=1))
    assert ours.try_acquire(now=START) and theirs.hit(item, "k")
    clock.time = lambda: START + 1
    # Windows are half-open, (t - 1 s, t], as GCRA's emission interval: one per second
    # means one at t and the next at t + 1. `limits` counts [t - 1 s, t] and refuses.
    assert ours.try_acquire(now=START + 1) is True
    assert theirs.hit(item, "k") is False


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_seconds_until_available_counts_down_and_takes_nothing(store: Store) -> None:
    """What Retry-After is made of: the wait for the next admission, on Redis time."""
    sliding = RateLimiter(store, fresh("sliding", max_requests=2, window_seconds=10))
    assert sliding.seconds_until_available() == 0.0
    assert sliding.try_acquire() and sliding.try_acquire()
    wait = sliding.seconds_until_available()
    assert wait is not None and 9.0 < wait <= 10.0
    assert sliding.available_tokens == 0.0  # asking took nothing, nor freed anything
    gcra = RateLimiter(store, fresh("gcra", rate=1, burst=1))
    assert gcra.try_acquire()
    wait = gcra.seconds_until_available()
    assert wait is not None and 0.0 < wait <= 1.0
    places = RateLimiter(store, fresh("concurrency", limit=1, lease_seconds=30))
    assert places.try_acquire(owner="holder")
    assert places.seconds_until_available() is None  # frees on release, not on time
    places.release("holder")
    assert places.seconds_until_available() == 0.0
