"""The reliability report over a known ledger, breaker history and DLQ (real Redis).

The ledger here is written with explicit stream ids and times (the format the settle
scripts write), so every number the report shows is known in advance; breaker history
comes from a real breaker driven with injected times. The scripted hour with a real
worker and the sandbox provider is tests/test_report_scripted.py.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from typing import Any

import pytest

from config.settings import SettingsError, load_settings
from reliability.alerts import AlertHooks
from reliability.breaker import BreakerConfig, CircuitBreaker
from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.ledger import Ledger
from reliability.reports import (
    Period,
    ReportConfig,
    ReportStore,
    build_report,
    render,
    write_report,
)
from reliability.reports.breakers import breaker_stats
from reliability.reports.sources import Transition
from reliability.reports.totals import percentile, slo_burn
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import Environment
from worker.schedule import beat_schedule

S = 1_699_999_200.0  # an hour boundary (UTC)
E = S + 3600
SEQ = itertools.count(1)  # stream id sequence numbers
EPOCH = re.compile(r"(?<![\w.])1[6-9]\d{8}(\.\d+)?(?![\w])|\b\d{13}-\d+\b")


def write(
    store: Store,
    at: float,
    task: str,
    task_id: str,
    outcome: str,
    attempt: int = 1,
    detail: str = "",
    duration: float | None = None,
) -> None:
    """One ledger entry as the settle scripts write it, at time ``at``."""
    fields: dict[str, Any] = {
        "task_id": task_id,
        "task": task,
        "outcome": outcome,
        "attempt": attempt,
        "detail": detail,
        "at": f"{at:.6f}",
    }
    if duration is not None:
        fields["duration"] = f"{duration:.6f}"
    store.client.xadd(store.keys.ledger, fields, id=f"{int(at * 1000)}-{next(SEQ)}")


@pytest.fixture
def history(bare_store: Store) -> Store:
    """A known hour: see the expected numbers in the tests."""
    w = bare_store
    write(w, S - 4000, "pay", "old", "succeeded", duration=9.0)  # before the lookback
    write(w, S - 10, "pay", "a", "retried", 1, "TransientError", 0.1)  # lookback: opens "a"
    write(w, S + 5, "pay", "a", "succeeded", 2, duration=0.2)
    write(w, S + 10, "pay", "b", "succeeded", 1, duration=0.3)
    write(w, S + 20, "pay", "c", "retried", 1, "TransientError", 0.1)
    write(w, S + 30, "pay", "c", "retried", 2, "TransientError", 0.1)
    write(w, S + 40, "pay", "c", "dead_lettered", 3, "transient", 0.4)
    write(w, S + 50, "pay", "d", "dead_lettered", 1, "poison")
    write(w, S + 60, "pay", "e", "skipped")
    write(w, S + 70, "pay", "f", "deferred", 1, "breaker_open")
    write(w, S + 71, "pay", "f", "deferred", 1, "breaker_open")
    write(w, S + 72, "pay", "f", "deferred", 1, "limit_delay")
    write(w, S + 80, "pay", "f", "succeeded", 1, duration=0.5)
    write(w, S + 90, "pay", "new-id", "redriven", 1, "dlq 0123")
    write(w, S + 100, "mail", "n", "succeeded", 1, duration=0.05)
    w.client.xadd(w.keys.ledger, {"outcome": "succeeded"}, id=f"{int((S + 101) * 1000)}-0")
    write(w, E + 1, "pay", "g", "succeeded", duration=0.1)  # after the period
    # The payment breaker opens twice in the hour (still open at its end); the
    # notification breaker opened before it and never closed.
    pay = CircuitBreaker(
        "payment",
        w,
        BreakerConfig(
            failure_threshold=1, recovery_timeout=30, half_open_max_calls=1, success_threshold=1
        ),
    )
    pay.admit("o", now=S + 200)
    pay.record("o", RuntimeError("down"), 0.1, now=S + 200)
    pay.admit("o", now=S + 230)  # recovery elapsed: half-open, this is the trial
    pay.record("o", None, 0.1, now=S + 231)
    pay.admit("o", now=S + 3500)
    pay.record("o", RuntimeError("down"), 0.1, now=S + 3500)
    mail = CircuitBreaker(
        "notification", w, BreakerConfig(failure_threshold=1, recovery_timeout=99_999)
    )
    mail.admit("o", now=S - 100)
    mail.record("o", RuntimeError("down"), 0.1, now=S - 100)
    return w


DEPENDENCIES = {"pay": "payment", "mail": "notification"}
CONFIG = ReportConfig(objectives={"pay": 0.9})


def test_a_task_s_counts_equal_what_its_ledger_records_say(history: Store) -> None:
    report = build_report(
        history, Period("hour", S, E), dependencies=DEPENDENCIES, config=CONFIG, now=E + 60
    )
    pay = report["tasks"]["pay"]
    assert {
        k: pay[k]
        for k in (
            "dependency",
            "received",
            "succeeded",
            "failed",
            "retried",
            "deduplicated",
            "deferred",
            "dead_lettered",
            "dead_lettered_by_class",
            "dlq_inflow",
            "dlq_outflow",
            "success_rate",
            "logical_tasks",
            "retry_amplification",
            "attempts_histogram",
            "run_time_seconds",
        )
    } == {
        "dependency": "payment",
        "received": 11,
        "succeeded": 3,
        "failed": 3,  # two retries and the transient dead letter (poison never ran)
        "retried": 2,
        "deduplicated": 1,
        "deferred": {"breaker_open": 2, "limit_delay": 1},
        "dead_lettered": 2,
        "dead_lettered_by_class": {"poison": 1, "transient": 1},
        "dlq_inflow": 2,
        "dlq_outflow": 1,
        "success_rate": 0.6,
        "logical_tasks": 5,  # a b c d f (e was a duplicate)
        "retry_amplification": 1.6,  # 2 + 1 + 3 + 1 + 1 attempts
        "attempts_histogram": {"1": 3, "2": 1, "3": 1, "4-5": 0, "6-10": 0, "11-20": 0, "21+": 0},
        "run_time_seconds": {"samples": 6, "p50": 0.2, "p95": 0.5, "p99": 0.5},
    }
    # Windows: a 15.2 s (its first attempt began in the lookback, 10.1 s before the
    # hour), b 0.3, c 20.1, d 0 (never ran), f 10 (deferred from +70 s, done at +80 s).
    assert pay["retry_window_seconds"] == {"p50": 10.0, "p95": 20.1, "max": 20.1}
    assert pay["slo"] == {"objective": 0.9, "burn_rate": 4.0, "status": "burning"}
    assert report["tasks"]["mail"]["received"] == 1 and "slo" not in report["tasks"]["mail"]
    assert report["ledger"] == {
        "records": 13,
        "unreadable": 1,
        "oldest_record_at": "2023-11-14T20:53:20.000Z",
        "trimmed": False,
    }
    assert report["totals"]["received"] == 12
    assert (report["start"], report["end"]) == (
        "2023-11-14T22:00:00.000Z",
        "2023-11-14T23:00:00.000Z",
    )


def test_dependencies_carry_breaker_open_time_and_flaps(history: Store) -> None:
    report = build_report(history, Period("hour", S, E), dependencies=DEPENDENCIES, now=E)
    payment = report["dependencies"]["payment"]
    assert payment["tasks"] == ["pay"] and payment["received"] == 11
    assert payment["breaker"] == {
        "breaker": "payment",
        "state_at_start": "closed",
        "state_at_end": "open",
        "open_seconds": 130.0,  # 200 -> 230, then 3500 -> the end
        "half_open_seconds": 1.0,
        "flaps": 2,
        "transitions": 4,
    }
    notification = report["dependencies"]["notification"]["breaker"]
    assert (
        notification["state_at_start"],
        notification["open_seconds"],
        notification["flaps"],
    ) == ("open", 3600.0, 0)


def test_breaker_stats_from_transitions() -> None:
    transitions = [
        Transition("x", "closed", "open", 5.0),
        Transition("x", "open", "half_open", 15.0),
        Transition("x", "half_open", "open", 16.0),
        Transition("x", "open", "half_open", 26.0),
        Transition("x", "half_open", "closed", 27.0),
        Transition("y", "closed", "open", -5.0),
        Transition("y", "open", "half_open", 200.0),  # after the period
        Transition("z", "closed", "open", -50.0),
        Transition("z", "open", "closed", -40.0),  # closed all period: not listed
    ]
    stats = breaker_stats(transitions, 0.0, 100.0)
    assert sorted(stats) == ["x", "y"]
    x = stats["x"]
    # One trip (closed -> open); the failed trial re-opening it is no new flap.
    assert (x.open_seconds, x.half_open_seconds, x.flaps, x.transitions) == (20.0, 2.0, 1, 5)
    assert (stats["y"].open_seconds, stats["y"].state_at_end) == (100.0, "open")


def test_anomalies_and_spikes_show_in_the_report_and_alert_once(bare_store: Store) -> None:
    # 30 tasks each retried 6 times within 10 s: a spike, excessive attempts, a high rate.
    rows = []
    for n in range(30):
        for attempt in range(1, 7):
            rows.append((S + 100 + n * 0.01 + attempt, f"s{n}", "retried", attempt))
        rows.append((S + 110 + n * 0.01, f"s{n}", "succeeded", 7))
    for at, task_id, outcome, attempt in sorted(rows):
        write(bare_store, at, "storm", task_id, outcome, attempt, duration=0.01)
    alerts: list[tuple[str, str, dict[str, Any]]] = []
    hooks = AlertHooks()
    hooks.add_log_hook(lambda event, message, context: alerts.append((event, message, context)))
    summary = write_report(
        bare_store, ReportStore(bare_store), Period("hour", S, E), hooks=hooks, now=E
    )
    report = ReportStore(bare_store).latest("hour")
    assert report is not None
    assert (summary["anomalies"], summary["spikes"], summary["received"]) == (2, 1, 210)
    # Raised once each, through the alert hooks.
    assert sorted((event, message) for event, message, _ in alerts) == [
        ("retry_anomaly", "storm: attempts 7 above 5"),
        ("retry_anomaly", "storm: share of attempts retried 0.8571 above 0.2"),
        ("retry_spike", "storm: 10 retries in 60 s (threshold 10)"),
    ]
    kinds = {(a["kind"], a["count"]) for a in report["anomalies"]}
    assert kinds == {("excessive_attempts", 30), ("high_retry_rate", 1)}
    assert len(report["spikes"]) == 1
    spike = report["spikes"][0]
    assert (spike["task"], spike["retries_in_window"], spike["threshold"]) == ("storm", 10, 10.0)
    assert report["tasks"]["storm"]["attempts_histogram"]["6-10"] == 30


def test_top_fingerprints_group_the_period_s_dlq_entries(bare_store: Store) -> None:
    dlq, ledger = DeadLetterQueue(bare_store), Ledger(bare_store)
    start = bare_store.now()
    for n, (kind, message) in enumerate(
        [
            ("TransientError", "http://x/charges answered 503 after 1.2s"),
            ("TransientError", "http://x/charges answered 502 after 30.0s"),
            ("PermanentError", "http://x/charges answered 402: card | declined"),
        ]
    ):
        dlq.add(
            DeadLetter(
                task_name="pay",
                task_id=f"t{n}",
                failure_class="transient",
                exception_type=kind,
                exception_message=message,
            ),
            ledger,
        )
    report = build_report(bare_store, Period("hour", start - 1, start + 60), now=start + 60)
    top = report["top_fingerprints"]
    assert [(g["count"], g["tasks"], g["failure_classes"]) for g in top] == [
        (2, ["pay"], ["transient"]),
        (1, ["pay"], ["transient"]),
    ]
    assert top[0]["label"] == "TransientError: http://x/charges answered <n> after <n>s"
    assert report["dlq"]["inflow"] == 3 and report["dlq"]["size"] == 3
    assert 59 <= report["dlq"]["oldest_age_seconds"] <= 61
    assert 59 <= report["tasks"]["pay"]["dlq_oldest_age_seconds"] <= 61
    markdown = render(report)
    assert "card \\| declined" in markdown, "a | in an error is escaped in the table"


def test_reports_are_kept_with_retention(bare_store: Store) -> None:
    reports = ReportStore(bare_store, {"hour": 3})
    assert reports.latest("hour") is None
    dropped = [reports.save(Period("hour", S + n * 3600, E + n * 3600), {"n": n}) for n in range(5)]
    assert dropped == [0, 0, 0, 1, 1]
    assert [r["n"] for r in reports.recent("hour")] == [4, 3, 2]
    reports.save(Period("hour", S + 4 * 3600, E + 4 * 3600), {"n": "again"})
    assert reports.latest("hour") == {"n": "again"} and reports.count("hour") == 3
    assert reports.latest("day") is None


def test_percentiles_and_slo_burn() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0
    assert slo_burn(0.99, 0.995) == {"objective": 0.99, "burn_rate": 0.5, "status": "ok"}
    assert slo_burn(0.99, None)["status"] == "no_data"


def test_period_alignment() -> None:
    assert Period.previous("hour", 3600, S + 1234) == Period("hour", S - 3600, S)
    assert Period.of_slot("day", 86400, 19_700) == Period("day", 19_699 * 86400, 19_700 * 86400)
    with pytest.raises(ValueError, match="end after"):
        Period("hour", S, S)


def reliable(env: Environment, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args)


def test_reliable_report_prints_the_latest_as_markdown_or_json(
    cli_env: Environment, history: Store
) -> None:
    empty = reliable(cli_env, "report", "--period", "day")
    assert (empty.returncode, empty.stdout.startswith("no report yet"), empty.stderr) == (
        0,
        True,
        "",
    )
    empty_json = reliable(cli_env, "report", "--period", "day", "--json")
    assert (empty_json.returncode, json.loads(empty_json.stdout), empty_json.stderr) == (
        0,
        None,
        "",
    )
    report = build_report(history, Period("hour", S, E), dependencies=DEPENDENCIES, now=E)
    ReportStore(Store(cli_env.redis_url, cli_env.prefix)).save(Period("hour", S, E), report)
    shown = reliable(cli_env, "report", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == report
    markdown = reliable(cli_env, "report", "--period", "hour")
    assert markdown.stdout == render(report)
    assert markdown.stdout.startswith("# Reliability report: hour 2023-11-14T22:00:00.000Z")
    assert "| pay | payment | 11 | 3 | 3 | 2 | 1 | 3 (breaker_open 2, limit_delay 1) |" in (
        markdown.stdout
    )
    for out in (shown.stdout, markdown.stdout):
        assert not EPOCH.search(out), "every time is ISO-8601"
    bad = reliable(cli_env, "report", "--period", "week")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_beat_schedules_both_reports_from_settings() -> None:
    settings = load_settings(maintenance={"report_hourly_seconds": 600})
    schedule = beat_schedule(settings)
    assert schedule["report-hourly"] == {"task": "maintenance.report_hourly", "schedule": 600.0}
    assert schedule["report-daily"] == {"task": "maintenance.report_daily", "schedule": 86400.0}


def test_a_bad_objective_or_spike_window_is_refused_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"RELIABLE_REPORTS__OBJECTIVES: .*between 0 and 1"):
        load_settings(reports={"objectives": {"payments.charge": 99}})
    with pytest.raises(SettingsError, match="SPIKE_BASELINE_SECONDS must exceed"):
        load_settings(reports={"spike_window_seconds": 900, "spike_baseline_seconds": 60})
