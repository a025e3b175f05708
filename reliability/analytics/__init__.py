"""Retry analytics (seed 004), fed from the outcome ledger.

Every delivery of a task ends in one ledger record (task, task id, outcome, attempt,
time), and a retried task keeps its task id, so the records of one task id are one
*logical task*. :class:`RetryWindowTracker` turns them into retry windows (first attempt
to final outcome); :class:`RetryHistogram` counts windows by attempts in seed 004's
buckets (1, 2, 3, 4-5, 6-10, 11-20, 21+); :class:`RetryAnomalyDetector` flags a high
retry rate, long windows and excessive attempts; :class:`RetrySpikeDetector` flags a
sliding window holding more retries than a baseline times a multiplier. All pure, with an
injected clock; the reliability report (:mod:`reliability.reports`) runs them per period.
"""

from reliability.analytics.detectors import (
    EXCESSIVE_ATTEMPTS,
    HIGH_RETRY_RATE,
    LONG_WINDOW,
    Anomaly,
    AnomalyThresholds,
    RetryAnomalyDetector,
    RetrySpikeDetector,
    Spike,
)
from reliability.analytics.windows import (
    BUCKETS,
    FINAL_OUTCOMES,
    RetryHistogram,
    RetryWindow,
    RetryWindowTracker,
    bucket_of,
)

__all__ = [
    "BUCKETS",
    "EXCESSIVE_ATTEMPTS",
    "FINAL_OUTCOMES",
    "HIGH_RETRY_RATE",
    "LONG_WINDOW",
    "Anomaly",
    "AnomalyThresholds",
    "RetryAnomalyDetector",
    "RetryHistogram",
    "RetrySpikeDetector",
    "RetryWindow",
    "RetryWindowTracker",
    "Spike",
    "bucket_of",
]
