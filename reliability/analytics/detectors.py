"""Retry anomaly and spike detectors (seed 004), over retry windows and retry times.

:class:`RetryAnomalyDetector` flags long windows and excessive attempts per closed
window, and a high retry rate per task; :class:`RetrySpikeDetector` flags a sliding
window holding more retries than the baseline before it times a multiplier. Pure: times
come from the records, or from an injected clock when a caller gives none.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from reliability.analytics.windows import Clock, RetryWindow


@dataclass(frozen=True)
class AnomalyThresholds:
    """When retries look wrong. Defaults: 20% of attempts retried (over at least 20
    attempts), a window longer than 5 minutes, more than 5 attempts."""

    retry_rate: float = 0.2
    min_attempts: int = 20
    window_seconds: float = 300.0
    attempts: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.retry_rate <= 1:
            raise ValueError(f"retry_rate must be in (0, 1], got {self.retry_rate}")
        if self.min_attempts < 1 or self.attempts < 1 or self.window_seconds <= 0:
            raise ValueError("min_attempts, attempts and window_seconds must be positive")


HIGH_RETRY_RATE = "high_retry_rate"
LONG_WINDOW = "long_window"
EXCESSIVE_ATTEMPTS = "excessive_attempts"


@dataclass(frozen=True)
class Anomaly:
    """One anomalous observation: its kind, the task, the value against the threshold."""

    kind: str
    task: str
    value: float
    threshold: float
    at: float
    task_id: str | None = None

    def message(self) -> str:
        what = {
            HIGH_RETRY_RATE: "share of attempts retried",
            LONG_WINDOW: "retry window seconds",
            EXCESSIVE_ATTEMPTS: "attempts",
        }.get(self.kind, self.kind)
        return f"{self.task}: {what} {self.value:g} above {self.threshold:g}"


class RetryAnomalyDetector:
    """Long windows and excessive attempts per window; a high retry rate per task."""

    def __init__(
        self, thresholds: AnomalyThresholds | None = None, clock: Clock = time.time
    ) -> None:
        self.thresholds = thresholds or AnomalyThresholds()
        self.clock = clock

    def record_window(self, window: RetryWindow) -> list[Anomaly]:
        """The anomalies one closed window shows (none, one or both kinds)."""
        t = self.thresholds
        found: list[Anomaly] = []
        if window.seconds > t.window_seconds:
            found.append(
                Anomaly(
                    LONG_WINDOW,
                    window.task,
                    round(window.seconds, 3),
                    t.window_seconds,
                    window.ended_at,
                    window.task_id,
                )
            )
        if window.attempts > t.attempts:
            found.append(
                Anomaly(
                    EXCESSIVE_ATTEMPTS,
                    window.task,
                    window.attempts,
                    t.attempts,
                    window.ended_at,
                    window.task_id,
                )
            )
        return found

    def check_rate(
        self, task: str, attempts: int, retries: int, at: float | None = None
    ) -> Anomaly | None:
        """A high retry rate: ``retries / attempts`` above the threshold, judged only
        over at least ``min_attempts`` attempts."""
        t = self.thresholds
        if attempts < t.min_attempts:
            return None
        rate = retries / attempts
        if rate <= t.retry_rate:
            return None
        moment = self.clock() if at is None else at
        return Anomaly(HIGH_RETRY_RATE, task, round(rate, 4), t.retry_rate, moment)


@dataclass(frozen=True)
class Spike:
    """Retries in a sliding window above the baseline times the multiplier."""

    task: str
    at: float
    count: int  # retries in the window ending at ``at``
    expected: float  # the baseline's retries per window
    threshold: float  # max(min_retries, multiplier * expected)
    window_seconds: float


class RetrySpikeDetector:
    """Sliding window of retries against the baseline rate before it (seed 004).

    The window is the last ``window_seconds``; the baseline is the retry rate over the
    ``baseline_seconds`` before the window (over the history watched so far — since
    ``since``, else the first retry — while shorter),
    scaled to one window. A spike fires when the window holds at least
    ``max(min_retries, multiplier * expected)`` retries — once per episode: it re-arms
    when the window falls back below the threshold. Memory is the retries of one
    baseline; each retry costs O(1) amortised. Times must not go backwards by more than
    a window (ledger order is fine).
    """

    def __init__(
        self,
        window_seconds: float = 60.0,
        baseline_seconds: float = 900.0,
        multiplier: float = 3.0,
        min_retries: int = 10,
        *,
        task: str = "",
        since: float | None = None,
        clock: Clock = time.time,
    ) -> None:
        if window_seconds <= 0 or baseline_seconds <= window_seconds:
            raise ValueError("need 0 < window_seconds < baseline_seconds")
        if multiplier < 1 or min_retries < 1:
            raise ValueError("multiplier must be >= 1 and min_retries >= 1")
        self.window_seconds = window_seconds
        self.baseline_seconds = baseline_seconds
        self.multiplier = multiplier
        self.min_retries = min_retries
        self.task = task
        self.clock = clock
        self._recent: deque[float] = deque()  # retries inside the window
        self._older: deque[float] = deque()  # retries in the baseline before it
        # Since when retries were watched (a quiet start is baseline too): default, the
        # first retry.
        self._first: float | None = since
        self._firing = False

    def _advance(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - self.window_seconds:
            self._older.append(self._recent.popleft())
        while self._older and self._older[0] <= now - self.baseline_seconds:
            self._older.popleft()

    def expected(self, now: float | None = None) -> float:
        """The baseline's retries per window at ``now``."""
        moment = self.clock() if now is None else now
        self._advance(moment)
        edge = moment - self.window_seconds
        span = self.baseline_seconds - self.window_seconds
        if self._first is not None:
            span = min(span, edge - self._first)
        if span <= 0:
            return 0.0
        return len(self._older) / span * self.window_seconds

    def record_retry(self, at: float | None = None) -> Spike | None:
        """Count one retry; the spike it starts, if any."""
        moment = self.clock() if at is None else at
        if self._first is None:
            self._first = moment
        self._recent.append(moment)
        expected = self.expected(moment)
        threshold = max(float(self.min_retries), self.multiplier * expected)
        count = len(self._recent)
        if count < threshold:
            self._firing = False
            return None
        if self._firing:
            return None
        self._firing = True
        return Spike(
            self.task, moment, count, round(expected, 3), round(threshold, 3), self.window_seconds
        )
