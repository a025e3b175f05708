"""Prometheus metrics for reliability concepts (not the task counters Flower exports).

Names share one prefix and end in ``_total`` / ``_seconds``; labels are bounded sets
(task names, outcomes, failure classes), never ids or timestamps. Under the prefork
pool the entry point sets ``PROMETHEUS_MULTIPROC_DIR`` so every process writes its own
file and the parent serves the sum.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

PREFIX = "reliable"

OUTCOMES = Counter(
    f"{PREFIX}_task_outcomes_total",
    "Delivery outcomes by task and outcome (succeeded, skipped, retried, ...).",
    ["task", "outcome"],
)
DEAD_LETTERS = Counter(
    f"{PREFIX}_dlq_entries_total",
    "Entries written to the dead-letter queue, by task and failure class.",
    ["task", "failure_class"],
)
DLQ_EVICTIONS = Counter(
    f"{PREFIX}_dlq_evictions_total", "Oldest DLQ entries evicted because the DLQ was full."
)
STORE_UNAVAILABLE = Counter(
    f"{PREFIX}_store_unavailable_total",
    "Times the Redis state store could not be reached, by operation.",
    ["operation"],
)
PARKED_MOVED = Counter(f"{PREFIX}_parked_moved_total", "Parked messages republished by the mover.")
LEASES_REAPED = Counter(
    f"{PREFIX}_leases_reaped_total",
    "Lapsed leases whose unacked message the reaper restored to the queue.",
)
WORKERS_REVIVED = Counter(
    f"{PREFIX}_workers_revived_total",
    "Dead workers (heartbeat expired) whose leases were freed and messages restored.",
)
PARKED = Gauge(
    f"{PREFIX}_parked_messages",
    "Messages parked in Redis waiting to be due.",
    multiprocess_mode="max",
)
JOB_RUNS = Counter(
    f"{PREFIX}_job_runs_total",
    "Maintenance job runs by job and status (ok, failed, skipped: the slot already ran).",
    ["job", "status"],
)
