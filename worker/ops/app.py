"""The FastAPI application of the ops service, built around one running service.

``create_app(service)`` takes what :mod:`worker.app` builds (settings, the reliability
runtime, the Celery app used to publish DLQ redrives). Failures become clear answers,
never a 500 with a traceback: the state store away is 503, a refused redrive 409,
a bad value 422 — and no answer carries a secret (the runtime's masker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from config import Settings
from reliability import exposition
from reliability.alerts import AlertHooks
from reliability.errors import BackendUnavailable, ConfigurationError, RedriveRefused
from reliability.fleet_metrics import FleetCollector
from reliability.reports.storage import ReportStore
from reliability.runtime import Runtime
from worker.alerting import alert_hooks
from worker.health import service_version
from worker.ops import admin, dashboard, health
from worker.ops.audit import Audit
from worker.ops.auth import Auth
from worker.ops.body_limit import BodyLimit
from worker.reporting import report_store

log = structlog.get_logger("worker.ops")


@dataclass
class Ops:
    """What the routes need, built once per process."""

    settings: Settings
    runtime: Runtime
    celery: Any
    auth: Auth
    audit: Audit
    hooks: AlertHooks
    reports: ReportStore
    version: str
    environment: str


def create_app(service: Any) -> FastAPI:
    settings: Settings = service.settings
    runtime: Runtime = service.runtime
    o = settings.ops
    ops = Ops(
        settings=settings,
        runtime=runtime,
        celery=service.app,
        auth=Auth(
            runtime.store,
            {name: token.get_secret_value() for name, token in o.admin_tokens.items()},
            o.auth_failures,
            o.auth_failure_window_seconds,
        ),
        audit=Audit(runtime.store, runtime.masker, o.audit_max_len),
        hooks=alert_hooks(settings, runtime),
        reports=report_store(runtime.store, settings),
        version=service_version(),
        environment=str(settings.environment),
    )
    app = FastAPI(
        title="reliable-worker ops",
        version=ops.version,
        description="Health, metrics and the admin API of the reliable Celery worker fleet.",
    )
    app.state.ops = ops
    app.add_middleware(BodyLimit)
    app.include_router(health.router)
    app.include_router(admin.router)
    dashboard.mount(app)

    # This process's counters (multiprocess sum) and the fleet's state read from Redis:
    # the fleet collector is registered here only, so fleet state is exported once.
    registry = exposition.registry(FleetCollector(runtime, settings.metrics.dlq_cache_seconds))

    @app.get("/metrics", tags=["metrics"], summary="Prometheus exposition")
    def metrics() -> Response:
        return Response(exposition.render(registry), media_type=exposition.CONTENT_TYPE)

    def masked(request: Request, status: int, exc: BaseException, what: str) -> JSONResponse:
        detail = runtime.masker.text(f"{what}: {exc}" if what else str(exc))
        log.warning("ops_request_failed", path=request.url.path, status=status, detail=detail)
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(RequestValidationError)
    def bad_input(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI echoes the rejected input: it may hold a secret (a token in the wrong
        # field). Where and why only.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": runtime.masker.text(str(e.get("msg", "")))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(BackendUnavailable)
    def store_away(request: Request, exc: BackendUnavailable) -> JSONResponse:
        return masked(request, 503, exc, "the state store is unavailable")

    @app.exception_handler(RedriveRefused)
    def refused(request: Request, exc: RedriveRefused) -> JSONResponse:
        return masked(request, 409, exc, "")

    @app.exception_handler(ConfigurationError)
    def invalid(request: Request, exc: ConfigurationError) -> JSONResponse:
        return masked(request, 422, exc, "")

    return app
