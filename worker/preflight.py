"""Start-up checks: broken configuration refuses to start; missing secrets are warned of.

Every module ``RELIABLE_WORKER__TASK_MODULES`` lists must exist: a worker or beat checks
them (:func:`refuse_missing_task_modules`, on Celery's ``import_modules`` signal, which
fires just before Celery imports them) and a missing one stops it with one line on
stderr and exit status :data:`EX_CONFIG`, instead of a traceback.

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

import importlib.util
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from config import Environment, Settings
from reliability.pipeline import GUARDS
from reliability.runtime import Runtime
from reliability.task import ReliableTask
from worker.multiproc import EX_CONFIG


def _known(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


# The setting that defines each kind of name a guard resolves (Guard.unresolved).
SETTING = {"breaker": "RELIABLE_BREAKERS", "rate limit": "RELIABLE_RATE_LIMITS"}


def unresolved_names(tasks: Mapping[str, Any], runtime: Runtime) -> list[str]:
    """One sentence per name a reliable task declares (a breaker, a rate limit: whatever
    its guards resolve) that the settings do not define, in task-name order."""
    problems: list[str] = []
    for name in sorted(tasks):
        task = tasks[name]
        if not isinstance(task, ReliableTask):
            continue
        for guard in GUARDS:
            for what, missing, known in guard.unresolved(task.spec.options, runtime):
                problems.append(
                    f"task {name} names {what} {missing!r}, which "
                    f"{SETTING.get(what, 'the settings')} does not define "
                    f"(known: {_known(known)})"
                )
    return problems


def refuse_broken_configuration(tasks: Mapping[str, Any], runtime: Runtime) -> None:
    """Exit with one line on stderr if any task names an undefined breaker or limit."""
    problems = unresolved_names(tasks, runtime)
    if problems:
        sys.stderr.write(f"configuration error: {'; '.join(problems)}\n")
        sys.stderr.flush()
        raise SystemExit(EX_CONFIG)


# The setting that lists the task modules a worker imports.
TASK_MODULES_SETTING = "RELIABLE_WORKER__TASK_MODULES"


def missing_task_modules(modules: Iterable[str]) -> list[str]:
    """One sentence per listed module that cannot be found (without importing it; only
    the packages above it are imported, as its import would)."""
    problems: list[str] = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
            why = f"No module named {name!r}"
        except ModuleNotFoundError as exc:
            found, why = False, str(exc)
        if not found:
            problems.append(
                f"{TASK_MODULES_SETTING} names module {name!r}, which cannot be imported ({why})"
            )
    return problems


def refuse_missing_task_modules(modules: Iterable[str]) -> None:
    """Exit with one line on stderr if a listed task module does not exist."""
    problems = missing_task_modules(modules)
    if problems:
        sys.stderr.write(f"configuration error: {'; '.join(problems)}\n")
        sys.stderr.flush()
        raise SystemExit(EX_CONFIG)


def run_security_checks(settings: Settings) -> list[str]:
    """Warn (log) about missing or weak secrets (seed 000's start-up checks); returns the
    warnings. Reads settings, so it lives here at the edge, not in the library."""
    log = structlog.get_logger("worker.preflight")
    production = settings.environment is Environment.PRODUCTION
    warnings: list[str] = []
    providers = settings.providers
    for name in ("payment_api_key", "notification_api_key"):
        secret = getattr(providers, name)
        value = secret.get_secret_value() if secret is not None else ""
        if not value:
            warnings.append(f"providers.{name} is not set")
        elif len(value) < 16:
            warnings.append(f"providers.{name} is shorter than 16 characters")
    redis_url = settings.redis.url.get_secret_value() if settings.redis.url else ""
    if production and redis_url and "@" not in redis_url and "unix" not in redis_url:
        warnings.append("redis.url has no password: production Redis should require AUTH")
    for warning in warnings:
        log.warning("security_check_warning", problem=warning)
    if not warnings:
        log.info("security_checks_passed")
    return warnings
