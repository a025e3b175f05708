"""Prometheus metrics for reliability concepts (not the task counters Flower exports).

Every family is defined here, through the cardinality guard (:mod:`reliability.cardinality`):
one prefix ``reliable_``, counters end in ``_total``, durations in ``_seconds``; the task
and queue labels are celery-exporter's ``name`` and ``queue_name``; every other label is a
bounded set (outcomes, failure classes, reasons, breaker and limit names). Under the
prefork pool the entry point sets ``PROMETHEUS_MULTIPROC_DIR`` (:mod:`worker.multiproc`)
so every process writes its own file and the serving process sums them
(:mod:`reliability.exposition`); every gauge therefore names its ``multiprocess_mode``.

Fleet-wide state (breaker states, limiter tokens, DLQ size, degradation level, parked
messages, leases held) is not counted per process: :mod:`reliability.fleet_metrics`
reads it from Redis, in the ops service only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from prometheus_client import Counter, Gauge, Histogram

from reliability.cardinality import GUARD, Labelled

PREFIX = "reliable"

GaugeMode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent"
]


def _name(name: str) -> str:
    return f"{PREFIX}_{name}"


def counter(name: str, doc: str) -> Counter:
    """An unlabelled counter ``reliable_<name>`` (``name`` ends in ``_total``)."""
    return Counter(_name(name), doc)


def labelled_counter(name: str, doc: str, labels: Sequence[str]) -> Labelled[Counter]:
    GUARD.check_names(_name(name), labels)
    return Labelled(Counter(_name(name), doc, list(labels)), _name(name))


def labelled_gauge(name: str, doc: str, labels: Sequence[str], mode: GaugeMode) -> Labelled[Gauge]:
    """A gauge must say how processes' values combine (``multiprocess_mode``)."""
    GUARD.check_names(_name(name), labels)
    return Labelled(Gauge(_name(name), doc, list(labels), multiprocess_mode=mode), _name(name))


def labelled_histogram(
    name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
) -> Labelled[Histogram]:
    GUARD.check_names(_name(name), labels)
    return Labelled(Histogram(_name(name), doc, list(labels), buckets=buckets), _name(name))


# -- task outcomes (worker pool children) -----------------------------------------------
OUTCOMES = labelled_counter(
    "task_outcomes_total",
    "Delivery outcomes by task and outcome (the outcome ledger's values).",
    ["name", "outcome"],
)
DEDUPLICATED = labelled_counter(
    "tasks_deduplicated_total",
    "Deliveries not run again: a completed idempotency key (completed_key) or another "
    "copy of a delivery that already ran (duplicate_delivery).",
    ["name", "reason"],
)
DEFERRALS = labelled_counter(
    "task_deferrals_total",
    "Deliveries parked without spending an attempt, by reason (in_progress, "
    "breaker_open, breaker_busy, limit_delay, limit_busy, degraded).",
    ["name", "reason"],
)
RETRIES = labelled_counter(
    "task_retries_total", "Failed deliveries parked for another attempt.", ["name"]
)
BUDGET_REFUSALS = labelled_counter(
    "retry_budget_refusals_total",
    "Retries the fleet-wide retry budget refused (the delivery was dead-lettered).",
    ["name"],
)
RUNNING = labelled_gauge(
    "tasks_running",
    "Task bodies running now, summed over live processes.",
    ["name"],
    mode="livesum",
)

# -- dead-letter queue ------------------------------------------------------------------
DEAD_LETTERS = labelled_counter(
    "dlq_entries_total",
    "Entries written to the dead-letter queue (DLQ in), by task and failure class.",
    ["name", "failure_class"],
)
DLQ_REDRIVEN = labelled_counter(
    "dlq_redriven_total", "DLQ entries re-enqueued (by an operator or the reprocessor).", ["name"]
)
DLQ_PURGED = counter("dlq_purged_total", "DLQ entries removed by a purge.")
DLQ_EVICTIONS = counter(
    "dlq_evictions_total", "Oldest DLQ entries evicted because the DLQ was full."
)

# -- breakers and limiters --------------------------------------------------------------
BREAKER_TRANSITIONS = labelled_counter(
    "circuit_breaker_transitions_total",
    "Circuit breaker state transitions, counted once fleet-wide.",
    ["breaker", "to"],
)
LIMIT_ADMITTED = labelled_counter(
    "rate_limit_admitted_total", "Deliveries a rate limit admitted, by limit.", ["limit"]
)
LIMIT_LIMITED = labelled_counter(
    "rate_limit_limited_total",
    "Deliveries a rate limit deferred (no token or no concurrency slot), by limit.",
    ["limit"],
)

# -- leases and the fleet's upkeep (worker main processes, beat) ----------------------
LEASE_RENEWALS = counter(
    "lease_renewals_total", "Idempotency and guard leases renewed by worker main processes."
)
LEASE_LAPSES = counter(
    "lease_lapses_total", "Leases found lapsed or taken over at renewal (renewed before)."
)
LEASES_REAPED = counter(
    "leases_reaped_total", "Lapsed leases whose unacked message the reaper restored to the queue."
)
WORKERS_REVIVED = counter(
    "workers_revived_total",
    "Dead workers (heartbeat expired) whose leases were freed and messages restored.",
)
PARKED_MOVED = counter("parked_moved_total", "Parked messages republished by the mover.")
JOB_RUNS = labelled_counter(
    "job_runs_total",
    "Maintenance job runs by job and status (ok, failed, skipped: the slot already ran).",
    ["job", "status"],
)
ALERTS = labelled_counter("alerts_total", "Alerts raised, by event type.", ["event_type"])
HOOK_FAILURES = labelled_counter(
    "alert_hook_failures_total",
    "Alert hooks that failed, by kind (log, metric, event, webhook).",
    ["kind"],
)

# -- the state store --------------------------------------------------------------------
STORE_UNAVAILABLE = labelled_counter(
    "store_unavailable_total",
    "Times the Redis state store could not be reached, by operation.",
    ["operation"],
)
STORE_LATENCY = labelled_histogram(
    "store_round_trip_seconds",
    "Round trips to the Redis state store (scripts and calls), by operation.",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)


def families() -> list[Any]:
    """Every per-process family defined here (for docs and tests)."""
    return [v for v in globals().values() if isinstance(v, Counter | Gauge | Histogram | Labelled)]
