"""``reliable report``: the latest reliability report, as Markdown or JSON."""

from __future__ import annotations

import json
from typing import Any

from reliability.reports import render
from worker.reporting import report_store

JOB_OF = {"hour": "report-hourly", "day": "report-daily"}


def show_report(service: Any, period: str, as_json: bool) -> int:
    """Print the newest ``period`` report; "no report yet" (exit 0) when there is none
    (with ``--json``: ``null``, so a script always reads JSON)."""
    report = report_store(service.runtime.store, service.settings).latest(period)
    if report is None:
        none_yet = f"no report yet (period {period}: beat's {JOB_OF[period]} job writes one)"
        print("null" if as_json else none_yet)
    elif as_json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report), end="")
    return 0
