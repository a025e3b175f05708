"""Retry analytics (seed 004): windows, histogram, anomaly and spike detectors.

Pure logic, so no Redis and no sleeping: times come from the records or from an
injected clock.
"""

from __future__ import annotations

import pytest

from reliability.analytics import (
    EXCESSIVE_ATTEMPTS,
    HIGH_RETRY_RATE,
    LONG_WINDOW,
    AnomalyThresholds,
    RetryAnomalyDetector,
    RetryHistogram,
    RetrySpikeDetector,
    RetryWindow,
    RetryWindowTracker,
    bucket_of,
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("attempts", "bucket"),
    [
        (1, "1"),
        (2, "2"),
        (3, "3"),
        (4, "4-5"),
        (5, "4-5"),
        (6, "6-10"),
        (10, "6-10"),
        (11, "11-20"),
        (20, "11-20"),
        (21, "21+"),
        (10_000, "21+"),
    ],
)
def test_attempts_fall_in_seed_004_buckets(attempts: int, bucket: str) -> None:
    assert bucket_of(attempts) == bucket


def test_histogram_counts_and_merges_and_refuses_zero_attempts() -> None:
    first, second = RetryHistogram(), RetryHistogram()
    for attempts in (1, 1, 2, 5, 25):
        first.record(attempts)
    second.record(5)
    first.merge(second)
    assert first.as_dict() == {"1": 2, "2": 1, "3": 0, "4-5": 2, "6-10": 0, "11-20": 0, "21+": 1}
    assert first.total == 6
    with pytest.raises(ValueError, match="at least 1"):
        first.record(0)


def test_a_window_runs_from_the_first_attempt_to_the_final_outcome() -> None:
    tracker = RetryWindowTracker()
    assert tracker.observe("t", "id1", "retried", 1, at=10.0, duration=0.5) is None
    assert tracker.observe("t", "id1", "deferred", 2, at=11.0) is None  # no attempt spent
    assert tracker.observe("t", "id1", "retried", 2, at=13.0, duration=0.5) is None
    window = tracker.observe("t", "id1", "succeeded", 3, at=20.0, duration=1.0)
    assert window == RetryWindow("t", "id1", 9.5, 20.0, 3, "succeeded")
    assert window.seconds == 10.5
    assert tracker.open_count == 0


def test_a_single_attempt_window_is_its_run_time_and_other_tasks_do_not_mix() -> None:
    tracker = RetryWindowTracker()
    tracker.observe("a", "x", "retried", 1, at=1.0)
    only = tracker.observe("b", "y", "dead_lettered", 1, at=5.0, duration=2.0)
    assert only == RetryWindow("b", "y", 3.0, 5.0, 1, "dead_lettered")
    assert tracker.open_count == 1


def test_the_final_records_attempt_wins_when_earlier_records_were_not_seen() -> None:
    # The task started before the ledger range read: only its last attempt is seen.
    window = RetryWindowTracker().observe("t", "late", "succeeded", 4, at=50.0, duration=1.0)
    assert window is not None and window.attempts == 4 and window.started_at == 49.0


def test_seed_004_calls_use_the_injected_clock() -> None:
    clock = Clock(100.0)
    tracker = RetryWindowTracker(clock=clock)
    tracker.start_window("job_123", "payments.charge")
    clock.now = 101.0
    assert tracker.increment_attempt("job_123") == 2
    clock.now = 130.0
    window = tracker.close_window("job_123", "succeeded")
    assert (window.started_at, window.ended_at, window.attempts) == (100.0, 130.0, 2)
    assert window.task == "payments.charge"


def test_open_windows_are_bounded() -> None:
    tracker = RetryWindowTracker(max_open=3)
    for n in range(5):
        tracker.start_window(f"id{n}", "t", at=float(n))
    assert tracker.open_count == 3
    # The oldest were forgotten: closing one starts and ends at the close.
    assert tracker.close_window("id0", "succeeded", at=9.0).started_at == 9.0
    assert tracker.close_window("id4", "succeeded", at=9.0).started_at == 4.0


def test_anomalies_flag_long_windows_and_excessive_attempts() -> None:
    detector = RetryAnomalyDetector(AnomalyThresholds(window_seconds=60, attempts=3))
    assert detector.record_window(RetryWindow("t", "ok", 0, 60, 3, "succeeded")) == []
    found = detector.record_window(RetryWindow("t", "bad", 0, 61, 4, "dead_lettered"))
    assert [(a.kind, a.value, a.threshold, a.task_id) for a in found] == [
        (LONG_WINDOW, 61, 60, "bad"),
        (EXCESSIVE_ATTEMPTS, 4, 3, "bad"),
    ]
    assert found[1].message() == "t: attempts 4 above 3"


def test_a_high_retry_rate_needs_enough_attempts() -> None:
    clock = Clock(500.0)
    detector = RetryAnomalyDetector(AnomalyThresholds(retry_rate=0.2, min_attempts=10), clock)
    assert detector.check_rate("t", attempts=9, retries=9) is None  # too few to judge
    assert detector.check_rate("t", attempts=10, retries=2) is None  # exactly the threshold
    found = detector.check_rate("t", attempts=10, retries=3)
    assert found is not None
    assert (found.kind, found.value, found.at) == (HIGH_RETRY_RATE, 0.3, 500.0)


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="retry_rate"):
        AnomalyThresholds(retry_rate=1.5)
    with pytest.raises(ValueError, match="positive"):
        AnomalyThresholds(attempts=0)
    with pytest.raises(ValueError, match="window_seconds < baseline_seconds"):
        RetrySpikeDetector(window_seconds=60, baseline_seconds=60)
    with pytest.raises(ValueError, match="multiplier"):
        RetrySpikeDetector(multiplier=0.5)


def test_a_burst_above_baseline_times_multiplier_is_one_spike_per_episode() -> None:
    clock = Clock(0.0)
    spikes = RetrySpikeDetector(60, 900, multiplier=3, min_retries=7, task="t", clock=clock)
    # Baseline: one retry every 10 s for 15 minutes = 6 per 60 s window (under the floor
    # of 7 while there is no history yet).
    for n in range(90):
        clock.now = n * 10.0
        assert spikes.record_retry() is None
    # Threshold 3 x 6 = 18 in a window: the window ending at 900 holds 5 baseline retries
    # (850..890); the 13th of the burst makes 18.
    found = []
    for n in range(20):
        clock.now = 900.0 + n * 0.05
        found.append(spikes.record_retry())
    fired = [s for s in found if s is not None]
    assert len(fired) == 1, "one spike per episode, not one per retry"
    spike = fired[0]
    assert (spike.task, spike.count, spike.expected, spike.threshold) == ("t", 18, 6.0, 18.0)
    # Quiet for longer than the window, then the same burst again: a new episode.
    clock.now = 1_200.0
    assert spikes.record_retry() is None  # re-armed: 1 retry in the window
    again = [spikes.record_retry(1_200.0 + n * 0.01) for n in range(30)]
    assert sum(s is not None for s in again) == 1


def test_with_no_baseline_the_floor_decides() -> None:
    spikes = RetrySpikeDetector(60, 900, multiplier=3, min_retries=10, since=0.0)
    results = [spikes.record_retry(1_000.0 + n) for n in range(10)]
    assert results[:9] == [None] * 9
    assert results[9] is not None and results[9].count == 10 and results[9].expected == 0.0


def test_a_quiet_history_counts_as_baseline() -> None:
    # Watched since 0 with no retries: the baseline is 0 per window, only the floor counts;
    # watched from the first retry only, a short history is scaled to its own length.
    watched = RetrySpikeDetector(60, 900, multiplier=2, min_retries=3, since=0.0)
    assert [watched.record_retry(1_000.0 + n) for n in range(3)][-1] is not None
    assert watched.expected(1_003.0) == 0.0
