"""The fleet-wide retry budget: its Lua against a Python reference model, and its settings.

The budget (reliability/lua/budget.lua) follows Finagle's RetryBudget: in any window of
``window`` seconds the retries of one hash tag may number ``per_second * window`` (the
floor) plus ``ratio`` of the calls ended in that window, counted per fixed window and
read as a sliding estimate over the current and the previous one. Real Redis, real
scripts; ``now`` is passed to every script (ARGV[1]) and advanced by the test, never by
sleeping. Counts are exact: the numbers below are the budget's arithmetic, worked out.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from config import SettingsError, load_settings
from reliability import scripts
from reliability.completion import COMPLETE
from reliability.deferral import PARK
from reliability.dlq import DEAD_LETTER
from reliability.errors import ConfigurationError
from reliability.runtime import (
    DEFAULT_BUDGET_MIN_RETRIES_PER_SECOND,
    DEFAULT_BUDGET_RATIO,
    DEFAULT_BUDGET_WINDOW_SECONDS,
    RuntimeConfig,
)
from reliability.store import Store
from worker.celeryconfig import runtime_config

ROOT = Path(__file__).resolve().parents[1]
# Logical clocks start far from zero, aligned to every window used here, on a grid of
# exact binary fractions.
START = 1_000_000.0
# The defaults, spelled out: 20% of calls plus 10 retries per second over 10 s.
RATIO, PER_SECOND, WINDOW = 0.2, 10.0, 10
FLOOR = 100  # PER_SECOND * WINDOW retries per window with no calls at all

# KEYS budget base   ARGV now, 'call' | 'retry', window_s, ratio, min_retries_per_s
BUDGET = scripts.compose(
    "budget",
    body="""
local window = tonumber(ARGV[3])
if ARGV[2] == 'call' then
  budget_count_call(KEYS[1], window)
  return 1
end
return budget_allow_retry(KEYS[1], window, tonumber(ARGV[4]), tonumber(ARGV[5]))
""",
)


class BudgetModel:
    """Calls and retries per fixed window; the previous window weighs what is left of it."""

    def __init__(self, window: int, ratio: float, per_second: float) -> None:
        self.window, self.ratio, self.per_second = window, ratio, per_second
        self.calls: Counter[int] = Counter()
        self.retries: Counter[int] = Counter()

    def index(self, now: float) -> int:
        return math.floor(now / self.window)

    def estimate(self, counts: Counter[int], now: float) -> float:
        idx = self.index(now)
        weight = 1 - (now - idx * self.window) / self.window
        return counts[idx] + counts[idx - 1] * weight

    def call(self, now: float) -> None:
        self.calls[self.index(now)] += 1

    def allow_retry(self, now: float) -> bool:
        allowance = self.per_second * self.window + self.ratio * self.estimate(self.calls, now)
        if self.estimate(self.retries, now) + 1 > allowance + 1e-9:
            return False
        self.retries[self.index(now)] += 1
        return True


class Budget:
    """One hash tag's budget on a store, driven on a logical clock."""

    def __init__(
        self,
        store: Store,
        window: int = WINDOW,
        ratio: float = RATIO,
        per_second: float = PER_SECOND,
    ) -> None:
        self.store, self.key = store, store.keys.budget(f"test.{uuid.uuid4().hex[:6]}")
        self.window, self.ratio, self.per_second = window, ratio, per_second

    def calls(self, now: float, times: int = 1) -> None:
        for _ in range(times):
            self.store.run(BUDGET, [self.key], [now, "call", self.window], "budget call")

    def retry(self, now: float) -> bool:
        return bool(
            self.store.run(
                BUDGET,
                [self.key],
                [now, "retry", self.window, self.ratio, self.per_second],
                "budget retry",
            )
        )

    def retries_allowed(self, now: float, asked: int) -> int:
        """Ask ``asked`` times at ``now``; how many were allowed (they stop at the first no)."""
        answers = [self.retry(now) for _ in range(asked)]
        allowed = answers.count(True)
        assert answers == [True] * allowed + [False] * (asked - allowed), answers
        return allowed

    def park(self, now: float, park_id: str | None = None) -> str:
        """``scripts.PARK`` in retry mode, as a failed attempt settles: counts the call, asks."""
        k = self.store.keys
        park_id = park_id or uuid.uuid4().hex
        keys, args = PARK.layout(
            {
                "leases": k.leases,
                "ledger": k.ledger,
                "budget": self.key,
                "parked": k.parked,
                "parked_msgs": k.parked_msgs,
            },
            {
                "mode": "retry",
                "budget_window": self.window,
                "budget_ratio": self.ratio,
                "budget_floor": self.per_second,
                "park_id": park_id,
                "delay": 1.0,
                "envelope": "{}",
                "dlv_ttl_ms": 60_000,
                "ledger_max": 1000,
                "task_id": park_id,
                "name": "test.budget",
                "attempt": 1,
                "outcome": "retried",
            },
            now=now,
        )
        reply = self.store.run(PARK.source, keys, args, "park")
        return str(reply[0])


def unique_prefix() -> str:
    return "b" + uuid.uuid4().hex[:10]


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.unlink(*keys)


# -- exact counts in one window ----------------------------------------------------------


def test_the_defaults_are_finagles_twenty_percent_plus_ten_per_second_over_ten_seconds() -> None:
    config = RuntimeConfig()
    assert (
        config.budget_ratio,
        config.budget_min_retries_per_second,
        config.budget_window_seconds,
    ) == (RATIO, PER_SECOND, WINDOW)
    assert (
        DEFAULT_BUDGET_RATIO,
        DEFAULT_BUDGET_MIN_RETRIES_PER_SECOND,
        DEFAULT_BUDGET_WINDOW_SECONDS,
    ) == (RATIO, PER_SECOND, WINDOW)


@pytest.mark.parametrize(
    ("calls", "allowed"), [(0, 100), (1, 100), (5, 101), (500, 200), (1000, 300), (2000, 500)]
)
def test_a_window_allows_the_floor_plus_a_fifth_of_its_calls(
    bare_store: Store, calls: int, allowed: int
) -> None:
    budget = Budget(bare_store)
    budget.calls(START + 1, calls)
    assert budget.retries_allowed(START + 2, allowed + 3) == allowed


def test_a_fractional_rate_floors_a_window_and_zero_allows_no_retry(bare_store: Store) -> None:
    assert Budget(bare_store, per_second=0.1).retries_allowed(START, 3) == 1  # 0.1/s x 10 s
    nothing = Budget(bare_store, ratio=0.0, per_second=0.0)
    nothing.calls(START, 50)
    assert nothing.retries_allowed(START, 2) == 0


def test_a_twenty_percent_failure_rate_is_retried_in_full(bare_store: Store) -> None:
    # 2,000 calls in one window, every fifth fails: 400 retries asked, 400 allowed.
    budget = Budget(bare_store)
    outcomes = [
        budget.park(START + 1) if n % 5 == 4 else budget.calls(START + 1) for n in range(2000)
    ]
    assert Counter(outcomes) == Counter({None: 1600, "parked": 400})


def test_a_retry_storm_is_cut_to_the_floor_plus_a_fifth_of_the_calls(bare_store: Store) -> None:
    # Every call fails and asks for a retry: the first 125 are all allowed (k <= 100 + k/5),
    # then one in five; 1,000 failed calls end with 100 + 200 = 300 retries, 700 refused.
    budget = Budget(bare_store)
    replies = [budget.park(START + 1) for _ in range(1000)]
    assert replies[:125] == ["parked"] * 125
    assert replies[125:130] == ["refused"] * 4 + ["parked"]
    assert Counter(replies) == Counter({"parked": 300, "refused": 700})
    assert bare_store.client.zcard(bare_store.keys.parked) == 300
    assert bare_store.client.xlen(bare_store.keys.ledger) == 300


def test_the_previous_window_fades_out_across_the_boundary(bare_store: Store) -> None:
    budget = Budget(bare_store)
    # Window 0: 500 calls allow 100 + 100 retries.
    budget.calls(START + 1, 500)
    assert budget.retries_allowed(START + 9, 201) == 200
    # A quarter into window 1 the last one weighs 3/4: 375 calls and 150 retries, so
    # 100 + 75 = 175 allow 25 more.
    assert budget.retries_allowed(START + 12.5, 26) == 25
    # Three quarters in, it weighs 1/4: 125 calls, 50 + 25 retries; 100 + 25 allow 50 more.
    assert budget.retries_allowed(START + 17.5, 51) == 50
    # Calls in the current window count whole: 100 more calls allow 20 more retries.
    budget.calls(START + 17.5, 100)
    assert budget.retries_allowed(START + 17.5, 21) == 20
    # Two windows on, window 0 is gone: window 1 weighs 1/2 (100 calls, 95 retries).
    # 100 + 10 = 110 allowed, 47.5 spent: 62 more.
    assert budget.retries_allowed(START + 25, 63) == 62
    # Later still, nothing counts but the floor.
    assert budget.retries_allowed(START + 50, 101) == 100


def test_a_refused_retry_parks_nothing_but_its_call_still_counts(bare_store: Store) -> None:
    budget = Budget(bare_store, ratio=0.5, per_second=0.0)
    budget.calls(START, 10)
    assert budget.retries_allowed(START + 1, 6) == 5
    # The park counts its call (11), but 6 retries would exceed half of 11: refused.
    assert budget.park(START + 1, "p1") == "refused"
    assert bare_store.client.zcard(bare_store.keys.parked) == 0
    assert bare_store.client.xlen(bare_store.keys.ledger) == 0
    # Its call counted: one more (12) allows the sixth.
    assert budget.park(START + 1, "p2") == "parked"
    assert bare_store.client.zrange(bare_store.keys.parked, 0, -1) == ["p2"]


def test_completions_and_dead_letters_count_as_calls(bare_store: Store) -> None:
    budget = Budget(bare_store, ratio=0.5, per_second=0.0)
    k = bare_store.keys
    for n in range(6):
        keys, args = COMPLETE.layout(
            {"leases": k.leases, "ledger": k.ledger, "budget": budget.key},
            {
                "result": "{}",
                "result_ttl": 60,
                "dlv_ttl_ms": 60_000,
                "ledger_max": 1000,
                "task_id": f"ok{n}",
                "name": "test.budget",
                "attempt": 1,
                "budget_window": WINDOW,
            },
            now=START,
        )
        bare_store.run(COMPLETE.source, keys, args, "complete")
    for n in range(4):
        keys, args = DEAD_LETTER.layout(
            {
                "leases": k.leases,
                "ledger": k.ledger,
                "budget": budget.key,
                "dlq": k.dlq,
                "dlq_index": k.dlq_index,
            },
            {
                "fence": "0",
                "budget_window": WINDOW,
                "entry_id": f"d{n}",
                "envelope": "{}",
                "max_entries": 100,
                "dlv_ttl_ms": 60_000,
                "ledger_max": 1000,
                "task_id": f"dl{n}",
                "name": "test.budget",
                "attempt": 1,
                "failure_class": "transient",
            },
            now=START,
        )
        bare_store.run(DEAD_LETTER.source, keys, args, "dead letter")
    assert budget.retries_allowed(START, 6) == 5  # half of 10 calls


# -- the Lua against the model, on random traffic ------------------------------------------

budget_events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=48).map(lambda n: n * 0.625),
        st.sampled_from(("call", "retry", "park")),
        st.integers(min_value=1, max_value=8),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=50, deadline=None)
@given(
    window=st.sampled_from((5, 10, 60)),
    ratio=st.sampled_from((0.0, 0.1, 0.2, 0.5, 1.0)),
    per_second=st.sampled_from((0.0, 0.05, 0.1, 0.5, 1.0)),
    events=budget_events,
)
def test_the_budget_matches_the_sliding_estimate_model(
    redis_url: str,
    window: int,
    ratio: float,
    per_second: float,
    events: list[tuple[float, str, int]],
) -> None:
    store = Store(redis_url, unique_prefix())
    budget = Budget(store, window, ratio, per_second)
    model = BudgetModel(window, ratio, per_second)
    now, parked = START, 0
    try:
        for n, (gap, kind, times) in enumerate(events):
            now += gap
            for i in range(times):
                if kind == "call":
                    budget.calls(now)
                    model.call(now)
                elif kind == "retry":
                    assert budget.retry(now) == model.allow_retry(now), (n, i, now)
                else:
                    model.call(now)
                    expected = "parked" if model.allow_retry(now) else "refused"
                    assert budget.park(now) == expected, (n, i, now)
                    parked += expected == "parked"
        assert store.client.zcard(store.keys.parked) == parked
    finally:
        delete_prefix(store.client, store.keys.prefix)
        store.close()


# -- settings ------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No RELIABLE_ variables and no .env file: only what the test sets."""
    for name in list(os.environ):
        if name.upper().startswith("RELIABLE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield monkeypatch


@pytest.mark.parametrize("environment", ["development", "testing", "production"])
def test_every_environment_gets_the_default_budget(
    clean_env: pytest.MonkeyPatch, environment: str
) -> None:
    clean_env.setenv("RELIABLE_ENVIRONMENT", environment)
    clean_env.setenv("RELIABLE_REDIS__URL", "redis://127.0.0.1:6379/0")
    config = runtime_config(load_settings())
    assert (
        config.budget_ratio,
        config.budget_min_retries_per_second,
        config.budget_window_seconds,
    ) == (RATIO, PER_SECOND, WINDOW)


def test_budget_settings_reach_the_runtime(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELIABLE_RETRY__BUDGET_RATIO", "0.5")
    clean_env.setenv("RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND", "0.25")
    clean_env.setenv("RELIABLE_RETRY__BUDGET_WINDOW_SECONDS", "30")
    config = runtime_config(load_settings())
    assert (
        config.budget_ratio,
        config.budget_min_retries_per_second,
        config.budget_window_seconds,
    ) == (0.5, 0.25, 30)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "RELIABLE_RETRY__BUDGET_MIN_RETRIES",
            "10",
            "RELIABLE_RETRY__BUDGET_MIN_RETRIES: renamed"
            " RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND, now a rate",
        ),
        (
            "RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND",
            "-1",
            "RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND: Input should be greater than or equal",
        ),
        (
            "RELIABLE_RETRY__BUDGET_RATIO",
            "-0.1",
            "RELIABLE_RETRY__BUDGET_RATIO: Input should be greater than or equal to 0",
        ),
        (
            "RELIABLE_RETRY__BUDGET_WINDOW_SECONDS",
            "0",
            "RELIABLE_RETRY__BUDGET_WINDOW_SECONDS: Input should be greater than or equal to 1",
        ),
    ],
    ids=["old-name", "negative-floor", "negative-ratio", "empty-window"],
)
def test_a_bad_or_renamed_budget_setting_is_refused_naming_the_variable(
    clean_env: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    [line] = [ln for ln in str(refused.value).splitlines() if ln.strip().startswith("RELIABLE_")]
    assert expected in line
    assert f"(got '{value}')" in line


def test_the_old_name_stops_a_fresh_process_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RELIABLE_")}
    env.update(PYTHONPATH=str(ROOT), RELIABLE_RETRY__BUDGET_MIN_RETRIES="1000")
    done = subprocess.run(
        [sys.executable, "-c", "import worker.app"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "RELIABLE_RETRY__BUDGET_MIN_RETRIES: renamed" in done.stderr
    assert "set that instead" in done.stderr


def test_a_runtime_config_refuses_a_negative_budget() -> None:
    with pytest.raises(ConfigurationError, match="must be >= 0"):
        RuntimeConfig(budget_min_retries_per_second=-1)
    with pytest.raises(ConfigurationError, match="must be >= 0"):
        RuntimeConfig(budget_ratio=-0.2)
    with pytest.raises(ConfigurationError, match="budget_window_seconds must be >= 1"):
        RuntimeConfig(budget_window_seconds=0)
