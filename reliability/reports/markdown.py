"""A report (the JSON-ready dict of :mod:`.builder`) as Markdown, for people."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reliability.analytics import BUCKETS


def _cell(value: Any) -> str:
    """A table cell: ``|`` escaped, one line, ``-`` for nothing."""
    if value is None or value == "":
        return "-"
    return " ".join(str(value).split()).replace("|", "\\|")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _run_times(s: Mapping[str, Any]) -> str:
    rt = s["run_time_seconds"]
    return f"{_ms(rt['p50'])} / {_ms(rt['p95'])} / {_ms(rt['p99'])}"


def _deferred(by_reason: Mapping[str, int]) -> str:
    total = sum(by_reason.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in by_reason.items()) + ")"


def _dead_lettered(s: Mapping[str, Any]) -> str:
    by_class = s["dead_lettered_by_class"]
    if not by_class:
        return str(s["dead_lettered"])
    return f"{s['dead_lettered']} (" + ", ".join(f"{k} {v}" for k, v in by_class.items()) + ")"


def render(report: Mapping[str, Any]) -> str:
    """The whole report as Markdown."""
    ledger = report["ledger"]
    trimmed = " (the ledger was trimmed: counts miss the period's start)"
    lines = [
        f"# Reliability report: {report['period']} {report['start']} to {report['end']}",
        "",
        f"Generated {report['generated_at']} from {ledger['records']} ledger records"
        f"{trimmed if ledger['trimmed'] else ''}.",
        "",
    ]
    tasks: Mapping[str, Any] = report["tasks"]
    lines += ["## Tasks", ""]
    if not tasks:
        lines += ["No task reached an outcome in this period.", ""]
    else:
        lines += _table(
            [
                "task",
                "dependency",
                "received",
                "succeeded",
                "failed",
                "retried",
                "deduplicated",
                "deferred (by reason)",
                "dead-lettered (by class)",
                "success rate",
                "attempts per task",
                "run time p50 / p95 / p99 (ms)",
            ],
            [
                [
                    _cell(name),
                    _cell(s["dependency"]),
                    str(s["received"]),
                    str(s["succeeded"]),
                    str(s["failed"]),
                    str(s["retried"]),
                    str(s["deduplicated"]),
                    _deferred(s["deferred"]),
                    _dead_lettered(s),
                    _rate(s["success_rate"]),
                    _num(s["retry_amplification"]),
                    _run_times(s),
                ]
                for name, s in tasks.items()
            ],
        )
        lines += ["", "Attempts per logical task (retry windows that closed in the period):", ""]
        labels = [b[0] for b in BUCKETS]
        lines += _table(
            ["task", *labels, "window p50 / p95 / max"],
            [
                [
                    _cell(name),
                    *(str(s["attempts_histogram"].get(b, 0)) for b in labels),
                    " / ".join(
                        _seconds(s["retry_window_seconds"][k]) for k in ("p50", "p95", "max")
                    ),
                ]
                for name, s in tasks.items()
            ],
        )
        lines.append("")
    lines += _dependencies(report["dependencies"])
    lines += _slo(tasks)
    lines += _dlq(report["dlq"], tasks)
    lines += _fingerprints(report["top_fingerprints"])
    lines += ["## Anomalies", ""]
    lines += [
        f"- {_cell(a['kind'])}: {_cell(a['message'])} ({a['count']}x"
        + (f", e.g. task {a['example_task_id']}" if a.get("example_task_id") else "")
        + ")"
        for a in report["anomalies"]
    ] or ["None."]
    lines += ["", "## Retry spikes", ""]
    lines += [
        f"- {_cell(s['task'])} at {s['at']}: {s['retries_in_window']} retries in"
        f" {_num(s['window_seconds'])} s (baseline {_num(s['expected'])}, threshold"
        f" {_num(s['threshold'])})"
        for s in report["spikes"]
    ] or ["None."]
    return "\n".join(lines) + "\n"


def _dependencies(deps: Mapping[str, Any]) -> list[str]:
    lines = ["## Dependencies (breakers)", ""]
    if not deps:
        return [*lines, "No task with a breaker ran, and no breaker changed state.", ""]
    rows = []
    for name, d in deps.items():
        b = d["breaker"]
        rows.append(
            [
                _cell(name),
                _cell(", ".join(d["tasks"])),
                str(d["received"]),
                str(d["succeeded"]),
                str(d["failed"]),
                _rate(d["success_rate"]),
                _num(d["retry_amplification"]),
                _run_times(d),
                _seconds(b["open_seconds"]),
                str(b["flaps"]),
                f"{b['state_at_start']} -> {b['state_at_end']}",
            ]
        )
    header = ["dependency", "tasks", "received", "succeeded", "failed", "success rate"]
    header += ["attempts per task", "run time p50 / p95 / p99 (ms)", "breaker open"]
    return [*lines, *_table([*header, "flaps", "state"], rows), ""]


def _slo(tasks: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            _cell(name),
            _rate(s["slo"]["objective"]),
            _rate(s["success_rate"]),
            _num(s["slo"]["burn_rate"]),
            s["slo"]["status"],
        ]
        for name, s in tasks.items()
        if "slo" in s
    ]
    if not rows:
        return []
    header = ["task", "objective", "success rate", "burn rate", "status"]
    return ["## SLO burn", "", *_table(header, rows), ""]


def _dlq(dlq: Mapping[str, Any], tasks: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Dead-letter queue",
        "",
        f"Inflow {dlq['inflow']}, outflow (redriven) {dlq['outflow']}; {dlq['size']} entries"
        f" now, oldest added {dlq['oldest_entry_at'] or '-'}"
        f" (age {_seconds(dlq['oldest_age_seconds'])}).",
        "",
    ]
    rows = [
        [
            _cell(name),
            str(s["dlq_inflow"]),
            str(s["dlq_outflow"]),
            _seconds(s["dlq_oldest_age_seconds"]),
        ]
        for name, s in tasks.items()
        if s["dlq_inflow"] or s["dlq_outflow"] or s["dlq_oldest_age_seconds"] is not None
    ]
    if rows:
        lines += [*_table(["task", "inflow", "outflow", "oldest entry age"], rows), ""]
    return lines


def _fingerprints(groups: list[Mapping[str, Any]]) -> list[str]:
    lines = ["## Top error fingerprints (DLQ entries added in the period)", ""]
    if not groups:
        return [*lines, "None.", ""]
    rows = [
        [
            f"`{g['fingerprint']}`",
            str(g["count"]),
            _cell(g["label"]),
            _cell(", ".join(g["tasks"])),
            _cell(", ".join(g["failure_classes"])),
        ]
        for g in groups
    ]
    return [*lines, *_table(["fingerprint", "entries", "error", "tasks", "class"], rows), ""]
