"""``/health`` routes: liveness, readiness (seed 002's shape) and what operators watch.

Liveness checks nothing (a dependency's outage must not restart the ops service);
readiness runs the critical components' checks now (``RELIABLE_HEALTH__CRITICAL``:
the state store and the broker), each bounded by its own timeout; ``/health/detailed``
runs every check and adds what the fleet's state holds (workers, breakers,
degradation, DLQ, the last job runs).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from reliability.health import HealthChecker, liveness
from reliability.jobs import Jobs
from worker import health as checks
from worker.ops import views

router = APIRouter(prefix="/health", tags=["health"])


def _live(ops: Any) -> dict[str, Any]:
    return liveness(version=ops.version, environment=ops.environment)


@router.get("", summary="Basic health (seed 002's quick health)")
@router.get("/", include_in_schema=False)
def health(request: Request) -> dict[str, Any]:
    return _live(request.app.state.ops)


@router.get("/live", summary="Liveness probe: the service answers (no dependency checked)")
def live(request: Request) -> dict[str, Any]:
    return _live(request.app.state.ops)


@router.get(
    "/ready",
    summary="Readiness probe: 200 when every critical component answers, else 503",
    responses={503: {"description": "a critical component is unhealthy"}},
)
def ready(request: Request) -> JSONResponse:
    ops = request.app.state.ops
    critical = set(ops.settings.health.critical)
    wanted = [c for c in checks.checks(ops.settings, ops.runtime) if c.name in critical]
    results = HealthChecker(wanted, ops.runtime.masker, slow_ms=ops.settings.health.slow_ms).run()
    body = checks.report(ops.settings, results)
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/detailed", summary="Every check now, plus workers, guards, DLQ and jobs")
def detailed(request: Request) -> dict[str, Any]:
    ops = request.app.state.ops
    rt = ops.runtime
    body = checks.report(ops.settings, checks.checker(ops.settings, rt).run())
    body.update(
        workers=views.workers(rt),
        circuit_breakers=views.breakers(rt),
        degradation=views.degradation(rt),
        dlq={k: v for k, v in views.dlq_summary(rt).items() if k != "groups"},
        jobs={name: vars(run) for name, run in Jobs(rt.store).latest().items()},
    )
    return body


@router.get("/circuit-breakers", summary="Every circuit breaker's state")
def circuit_breakers(request: Request) -> dict[str, Any]:
    return {"breakers": views.breakers(request.app.state.ops.runtime)}


@router.get("/degradation", summary="The fleet's degradation level, and why")
def degradation(request: Request) -> dict[str, Any]:
    return views.degradation(request.app.state.ops.runtime)


@router.get("/dlq", summary="DLQ totals by class, oldest age, top error fingerprints")
def dlq(request: Request) -> dict[str, Any]:
    summary = views.dlq_summary(request.app.state.ops.runtime)
    summary["groups"] = summary["groups"][:10]
    return summary
