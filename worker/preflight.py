"""Start-up checks: a worker whose tasks name settings that do not exist refuses to start.

A task declares its breaker and rate limits by name (``breaker="payment"``,
``rate_limits=("payment-gateway",)``); the names are resolved against the settings
(``RELIABLE_BREAKERS``, ``RELIABLE_RATE_LIMITS`` and their built-in defaults) when the
worker starts, in its main process and before it consumes. A missing name stops the
worker with one line on stderr and exit status :data:`EX_CONFIG` — instead of starting
and dead-lettering every message of that task as ``poison``.

Celery swallows ``Exception`` from signal receivers, so :func:`refuse_broken_configuration`
raises :class:`SystemExit`, which propagates.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from reliability.runtime import Runtime
from reliability.task import ReliableTask

# sysexits.h EX_CONFIG: a supervisor (``reliable run``) does not restart on it.
EX_CONFIG = 78


def _known(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


def unresolved_names(tasks: Mapping[str, Any], runtime: Runtime) -> list[str]:
    """One sentence per breaker or rate-limit name a reliable task declares that the
    settings do not define, in task-name order."""
    breakers = runtime.breakers.configs
    limits = runtime.rate_limits
    problems: list[str] = []
    for name in sorted(tasks):
        task = tasks[name]
        if not isinstance(task, ReliableTask):
            continue
        if task.breaker and task.breaker not in breakers:
            problems.append(
                f"task {name} names breaker {task.breaker!r}, which RELIABLE_BREAKERS does "
                f"not define (known: {_known(breakers)})"
            )
        for limit in task.rate_limits:
            if isinstance(limit, str) and limit not in limits:
                problems.append(
                    f"task {name} names rate limit {limit!r}, which RELIABLE_RATE_LIMITS does "
                    f"not define (known: {_known(limits)})"
                )
    return problems


def refuse_broken_configuration(tasks: Mapping[str, Any], runtime: Runtime) -> None:
    """Exit with one line on stderr if any task names an undefined breaker or limit."""
    problems = unresolved_names(tasks, runtime)
    if problems:
        sys.stderr.write(f"configuration error: {'; '.join(problems)}\n")
        sys.stderr.flush()
        raise SystemExit(EX_CONFIG)
