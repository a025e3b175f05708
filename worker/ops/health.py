"""``/health`` routes: liveness, readiness (seed 002's shape) and what operators watch."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from reliability.jobs import Jobs
from worker.ops import views

router = APIRouter(prefix="/health", tags=["health"])


def _component(check: Callable[[], object]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:
        return {
            "status": "unhealthy",
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "message": type(exc).__name__,
        }
    return {
        "status": "healthy",
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        "message": "connected",
    }


def components(ops: Any) -> dict[str, dict[str, Any]]:
    """The state store and the broker, each checked now."""

    def broker() -> None:
        with ops.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=ops.timeout)

    return {
        "redis": _component(lambda: ops.runtime.store.client.ping()),
        "broker": _component(broker),
    }


def _overall(parts: dict[str, dict[str, Any]]) -> str:
    return "healthy" if all(p["status"] == "healthy" for p in parts.values()) else "unhealthy"


@router.get("", summary="Basic health (liveness, seed 002)")
@router.get("/", include_in_schema=False)
def health(request: Request) -> dict[str, Any]:
    ops = request.app.state.ops
    return {"status": "healthy", "version": ops.version, "environment": ops.environment}


@router.get("/live", summary="Liveness probe: the service answers")
def live(request: Request) -> dict[str, Any]:
    return health(request)


@router.get(
    "/ready",
    summary="Readiness probe: 200 when the state store and broker answer, else 503",
    responses={503: {"description": "a dependency is unhealthy"}},
)
def ready(request: Request) -> JSONResponse:
    ops = request.app.state.ops
    parts = components(ops)
    body = {**health(request), "status": _overall(parts), "components": parts}
    return JSONResponse(body, status_code=200 if body["status"] == "healthy" else 503)


@router.get("/detailed", summary="Everything at once: dependencies, workers, guards, DLQ, jobs")
def detailed(request: Request) -> dict[str, Any]:
    ops = request.app.state.ops
    rt = ops.runtime
    parts = components(ops)
    return {
        **health(request),
        "status": _overall(parts),
        "components": parts,
        "workers": views.workers(rt),
        "circuit_breakers": views.breakers(rt),
        "degradation": views.degradation(rt),
        "dlq": {k: v for k, v in views.dlq_summary(rt).items() if k != "groups"},
        "jobs": {name: run.__dict__ for name, run in Jobs(rt.store).latest().items()},
    }


@router.get("/circuit-breakers", summary="Every circuit breaker's state")
def circuit_breakers(request: Request) -> dict[str, Any]:
    return {"breakers": views.breakers(request.app.state.ops.runtime)}


@router.get("/degradation", summary="The fleet's degradation level and why")
def degradation(request: Request) -> dict[str, Any]:
    return views.degradation(request.app.state.ops.runtime)


@router.get("/dlq", summary="DLQ totals by class, oldest age, top error fingerprints")
def dlq(request: Request) -> dict[str, Any]:
    summary = views.dlq_summary(request.app.state.ops.runtime)
    summary["groups"] = summary["groups"][:10]
    return summary
