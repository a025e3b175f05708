"""Health checks built from settings: beat's ``health-poll`` job and ``reliable health``.

The checks (:mod:`reliability.health`, :mod:`reliability.probes`): the state store, the
broker, each downstream API whose probe path is set, the workers' heartbeats and beat.
The job stores each poll (``P:health`` and its history); ``reliable health`` runs the
checks now, prints them and stores nothing (an operator's laptop does not see what the
fleet sees), exiting 1 when not ready.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import structlog

from config import Settings
from reliability.health import (
    Check,
    ComponentHealth,
    HealthBoard,
    HealthChecker,
    Status,
    readiness,
    summary,
)
from reliability.jobs import Jobs
from reliability.probes import (
    BeatPulse,
    beat_probe,
    broker_probe,
    http_probe,
    redis_probe,
    workers_probe,
)
from reliability.runtime import Runtime
from worker.celeryconfig import state_url
from worker.embedded import broker_url_for
from worker.schedule import JOBS

log = structlog.get_logger("worker.health")

PROVIDERS = ("payment", "notification", "export")


def service_version() -> str:
    try:
        return version("reliable-worker")
    except PackageNotFoundError:
        return "unknown"


def pulse(settings: Settings, runtime: Runtime) -> BeatPulse:
    return BeatPulse(runtime.store, settings.health.beat_stale_seconds)


def checks(settings: Settings, runtime: Runtime) -> list[Check]:
    """Every component's check, with its own timeout."""
    h = settings.health
    store = runtime.store
    state = state_url(settings)
    broker = settings.broker.url.get_secret_value() if settings.broker.url else None
    intervals = {job.name: job.every(settings.maintenance) for job in JOBS}
    found = [
        Check("redis", redis_probe(state, h.redis_timeout_seconds), h.redis_timeout_seconds),
        Check(
            "broker",
            broker_probe(broker or broker_url_for(state), h.broker_timeout_seconds),
            h.broker_timeout_seconds,
        ),
        Check("workers", workers_probe(store, h.min_workers), h.redis_timeout_seconds),
        Check(
            "beat",
            beat_probe(pulse(settings, runtime), Jobs(store), intervals),
            h.redis_timeout_seconds,
        ),
    ]
    for name in PROVIDERS:
        path = getattr(h, f"{name}_probe_path")
        if path:
            base = getattr(settings.providers, f"{name}_base_url").rstrip("/")
            timeout = h.provider_timeout_seconds
            found.append(Check(f"provider:{name}", http_probe(base + path, timeout), timeout))
    return found


def checker(settings: Settings, runtime: Runtime) -> HealthChecker:
    return HealthChecker(checks(settings, runtime), runtime.masker, slow_ms=settings.health.slow_ms)


def report(settings: Settings, results: list[ComponentHealth]) -> dict[str, Any]:
    """Seed 002's readiness body for these results."""
    return readiness(
        results,
        settings.health.critical,
        version=service_version(),
        environment=str(settings.environment),
    )


def poll(settings: Settings, runtime: Runtime) -> dict[str, Any]:
    """Check every component, store the results; what the job ledger records."""
    results = checker(settings, runtime).run()
    HealthBoard(runtime.store, settings.health.history).record(results)
    body = report(settings, results)
    # "health", not "status": the job ledger's run has a status of its own (ok, failed).
    outcome = {"health": body["status"], "ready": body["ready"], **summary(results)}
    for result in results:
        if result.status is not Status.HEALTHY:
            log.warning(
                "health_component_not_healthy",
                component=result.name,
                status=result.status.value,
                error=result.error,
            )
    log.info("health_polled", **outcome)
    return outcome


def show(settings: Settings, runtime: Runtime, as_json: bool) -> int:
    """``reliable health``: run the checks now and print them; 0 when ready, else 1."""
    results = checker(settings, runtime).run()
    body = report(settings, results)
    if as_json:
        print(json.dumps(body, indent=2))
    else:
        print(
            f"status={body['status']} ready={'yes' if body['ready'] else 'no'} "
            f"(critical: {', '.join(settings.health.critical)})"
        )
        for result in results:
            print(
                f"{result.name:<22} {result.status.value:<10} {result.latency_ms:9.1f} ms  "
                f"{result.error or result.detail}".rstrip()
            )
    return 0 if body["ready"] else 1
