"""The reliability report, per hour and per day (issue 8, item 7).

:func:`build_report` sums a period up from the outcome ledger, the breaker transitions
stream and the DLQ; :class:`ReportStore` keeps reports with retention; :func:`render`
writes one as Markdown; :func:`write_report` is the beat job's work.
"""

from reliability.reports.builder import ReportConfig, build_report
from reliability.reports.job import write_report
from reliability.reports.markdown import render
from reliability.reports.period import DAY, HOUR, PERIODS, Period, iso
from reliability.reports.storage import ReportStore

__all__ = [
    "DAY",
    "HOUR",
    "PERIODS",
    "Period",
    "ReportConfig",
    "ReportStore",
    "build_report",
    "iso",
    "render",
    "write_report",
]
