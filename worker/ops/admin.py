"""``/admin/reliability`` routes: see and steer breakers, degradation, DLQ, limits, reports.

Every route needs an admin bearer token (:mod:`worker.ops.auth`); every action that
changes something is recorded in the audit trail with who did it. Bodies and query
parameters are validated by FastAPI (422 with a clear message on bad input).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from reliability.breaker import BreakerMode
from reliability.degradation import DegradationState, Level
from reliability.dlq import Filter
from reliability.errors import ConfigurationError
from reliability.ratelimit import RateLimiter
from worker.ops import views
from worker.ops.auth import bearer, client_of

Name = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
EntryId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


def admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """Who is calling (the admin token's name); 401/403/429 otherwise."""
    who: str = request.app.state.ops.auth.who(client_of(request), credentials)
    return who


Who = Annotated[str, Depends(admin)]
router = APIRouter(prefix="/admin/reliability", tags=["admin"])


def _ops(request: Request) -> Any:
    return request.app.state.ops


# -- circuit breakers ------------------------------------------------------------------

BreakerAction = Literal["reset", "force-open", "disable", "shadow", "normal"]
MODES = {
    "force-open": BreakerMode.FORCED_OPEN,
    "disable": BreakerMode.DISABLED,
    "shadow": BreakerMode.SHADOW,
    "normal": BreakerMode.NORMAL,
}


@router.get("/circuit-breakers", summary="Every breaker: state, mode, failure count")
def list_breakers(request: Request, who: Who) -> dict[str, Any]:
    return {"breakers": views.breakers(_ops(request).runtime)}


@router.post("/circuit-breakers/{name}/{action}", summary="Reset a breaker or set its mode")
def breaker_action(request: Request, who: Who, name: Name, action: BreakerAction) -> dict[str, Any]:
    ops = _ops(request)
    registry = ops.runtime.breakers
    if name not in registry.configs:
        raise HTTPException(404, f"no circuit breaker named {name!r}")
    breaker = registry.get(name)
    if action == "reset":
        breaker.reset()
    else:
        breaker.set_mode(MODES[action])
    ops.audit.record(who, f"breaker.{action}", name)
    # The same view as the list (a forced-open breaker reads "open" in both).
    return views.breaker(ops.runtime, breaker)


# -- DLQ --------------------------------------------------------------------------------


class DlqSelection(BaseModel):
    """Which entries a bulk retry or purge applies to (all given conditions hold)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt condition must not widen the match

    failure_class: str | None = Field(None, max_length=64)
    task: str | None = Field(None, max_length=256)
    fingerprint: str | None = Field(None, pattern=r"^[0-9a-f]{12}$")
    since: float | None = Field(None, ge=0)
    until: float | None = Field(None, ge=0)

    def filter(self) -> Filter:
        return Filter(
            failure_class=self.failure_class,
            task_name=self.task,
            since=self.since,
            until=self.until,
            fingerprint=self.fingerprint,
        )


class Purge(DlqSelection):
    confirm: bool = Field(description="must be true: purging deletes entries for good")


@router.get("/dlq", summary="DLQ entries, newest first, filtered and paged")
def list_dlq(
    request: Request,
    who: Who,
    failure_class: Annotated[str | None, Query(max_length=64)] = None,
    task: Annotated[str | None, Query(max_length=256)] = None,
    fingerprint: Annotated[str | None, Query(pattern=r"^[0-9a-f]{12}$")] = None,
    since: Annotated[float | None, Query(ge=0)] = None,
    until: Annotated[float | None, Query(ge=0)] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    rt = _ops(request).runtime
    where = DlqSelection(
        failure_class=failure_class, task=task, fingerprint=fingerprint, since=since, until=until
    ).filter()
    page = rt.dlq.page(where, offset=offset, limit=limit + 1)
    return {
        "total": rt.dlq.count(),
        "offset": offset,
        "limit": limit,
        "has_more": len(page) > limit,
        "entries": [views.dlq_entry(e) for e in page[:limit]],
    }


@router.get("/dlq/groups", summary="DLQ entries grouped by error fingerprint")
def dlq_groups(request: Request, who: Who) -> dict[str, Any]:
    return views.dlq_summary(_ops(request).runtime)


@router.get("/dlq/{entry_id}", summary="One DLQ entry, whole")
def show_dlq(request: Request, who: Who, entry_id: EntryId) -> dict[str, Any]:
    entry = _ops(request).runtime.dlq.get(entry_id)
    if entry is None:
        raise HTTPException(404, f"no DLQ entry {entry_id}")
    return views.dlq_entry(entry)


@router.post("/dlq/{entry_id}/retry", summary="Redrive one entry (claimed, audited)")
def retry_dlq(request: Request, who: Who, entry_id: EntryId) -> dict[str, Any]:
    ops = _ops(request)
    if ops.runtime.dlq.get(entry_id) is None:
        raise HTTPException(404, f"no DLQ entry {entry_id}")
    task_id = ops.runtime.dlq.redrive(entry_id, ops.celery, by=f"ops:{who}")
    ops.audit.record(who, "dlq.retry", entry_id, task_id=task_id)
    return {"entry_id": entry_id, "task_id": task_id}


@router.post("/dlq/retry", summary="Redrive every matching entry")
def retry_matching(request: Request, who: Who, selection: DlqSelection) -> dict[str, Any]:
    ops = _ops(request)
    done, refused = ops.runtime.dlq.redrive_matching(
        selection.filter(), ops.celery, by=f"ops:{who}"
    )
    ops.audit.record(
        who, "dlq.retry_matching", "dlq", selection=selection.model_dump(), redriven=len(done)
    )
    return {"redriven": done, "refused": refused}


@router.post("/dlq/purge", summary="Delete every matching entry (confirm: true)")
def purge(request: Request, who: Who, selection: Purge) -> dict[str, Any]:
    if not selection.confirm:
        raise HTTPException(422, "purging deletes entries for good: send confirm: true")
    ops = _ops(request)
    removed = ops.runtime.dlq.purge(selection.filter())
    ops.audit.record(who, "dlq.purge", "dlq", selection=selection.model_dump(), purged=removed)
    return {"purged": removed}


# -- rate limits ---------------------------------------------------------------------------


class RateChange(BaseModel):
    """New values for a limit, fleet-wide (only those its kind has)."""

    model_config = ConfigDict(extra="forbid")

    rate: float | None = Field(None, gt=0, le=1e9)
    burst: int | None = Field(None, ge=1, le=1_000_000_000)
    max_requests: int | None = Field(None, ge=1, le=1_000_000_000)
    window_seconds: float | None = Field(None, gt=0, le=1e9)
    limit: int | None = Field(None, ge=1, le=1_000_000_000)


SETTABLE = {
    "gcra": ("rate", "burst"),
    "sliding": ("max_requests", "window_seconds"),
    "fixed": ("max_requests", "window_seconds"),
    "concurrency": ("limit",),
}


@router.get("/rate-limits", summary="Every rate limit: values in force, available tokens")
def list_limits(request: Request, who: Who) -> dict[str, Any]:
    return {"rate_limits": views.limits(_ops(request).runtime)}


@router.post("/rate-limits/{name}", summary="Change a limit at runtime, fleet-wide")
def set_limit(request: Request, who: Who, name: Name, change: RateChange) -> dict[str, Any]:
    ops = _ops(request)
    limit = ops.runtime.rate_limits.get(name)
    if limit is None:
        raise HTTPException(404, f"no rate limit named {name!r}")
    values = change.model_dump(exclude_none=True)
    allowed = SETTABLE[limit.kind]
    wrong = sorted(set(values) - set(allowed))
    if wrong or not values:
        raise HTTPException(
            422, f"rate limit {name} is {limit.kind}: set {' and/or '.join(allowed)}"
        )
    limiter = RateLimiter(ops.runtime.store, limit)
    try:
        wanted = dataclasses.replace(limiter.current(), **values)
    except ConfigurationError as exc:
        raise HTTPException(422, str(exc)) from None
    limiter.set_rate(
        values.get("rate") and wanted.rate,
        values.get("burst") and wanted.burst,
        max_requests=values.get("max_requests") and wanted.max_requests,
        window_seconds=values.get("window_seconds") and wanted.window_seconds,
        limit=values.get("limit") and wanted.limit,
    )
    ops.audit.record(who, "rate_limit.set", name, **values)
    return {"name": name, **dataclasses.asdict(limiter.current())}


# -- ledger and audit --------------------------------------------------------------------


@router.get("/ledger", summary="Recent outcomes, newest first (optionally of one task)")
def ledger(
    request: Request,
    who: Who,
    task: Annotated[str | None, Query(max_length=256)] = None,
    count: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    rt = _ops(request).runtime
    rows = rt.ledger.tail(count if task is None else min(10 * count, 10_000))
    if task is not None:
        rows = [r for r in rows if r.get("task") == task][:count]
    return {"entries": [views.ledger_row(row) for row in rows]}


@router.get("/audit", summary="Recent admin actions, newest first")
def audit(
    request: Request, who: Who, count: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    return {"entries": _ops(request).audit.recent(count)}


# -- degradation ---------------------------------------------------------------------------


@router.get("/degradation", summary="The degradation level in force, computed, override")
def show_degradation(request: Request, who: Who) -> dict[str, Any]:
    return views.degradation(_ops(request).runtime)


@router.post("/degradation/set-level", summary="Hold the fleet at a level (reason, expiry)")
def set_level(
    request: Request,
    who: Who,
    level: Annotated[Level, Query(description="NORMAL, MINOR, MODERATE, SEVERE or CRITICAL")],
    reason: Annotated[str, Query(min_length=1, max_length=500)],
    expires_minutes: Annotated[float, Query(gt=0, le=7 * 24 * 60)] = 60,
) -> dict[str, Any]:
    ops = _ops(request)
    if not reason.strip():
        raise HTTPException(422, "a degradation override needs a reason")
    state = DegradationState(ops.runtime.store, ops.hooks)
    status = state.set_override(level, reason, expires_minutes * 60, f"ops:{who}")
    ops.audit.record(who, "degradation.set", level.value, reason=reason, minutes=expires_minutes)
    found: dict[str, Any] = status.as_dict()
    return found


@router.post("/degradation/clear", summary="Drop the override: the rules' level applies")
def clear_level(request: Request, who: Who) -> dict[str, Any]:
    ops = _ops(request)
    status = DegradationState(ops.runtime.store, ops.hooks).clear_override()
    ops.audit.record(who, "degradation.clear", "override")
    found: dict[str, Any] = status.as_dict()
    return found


# -- reports -------------------------------------------------------------------------------

Period = Literal["hour", "day"]


@router.get("/reports/reliability", summary="The latest hourly reliability report (seed 003)")
def latest_report(request: Request, who: Who) -> dict[str, Any]:
    return report(request, who, "hour")


@router.get("/reports/{period}", summary="The latest report of a period (hour or day)")
def report(request: Request, who: Who, period: Period) -> dict[str, Any]:
    found = _ops(request).reports.latest(period)
    if found is None:
        raise HTTPException(404, f"no {period} report yet (beat's report job writes one)")
    result: dict[str, Any] = found
    return result


@router.get("/reports/{period}/recent", summary="The newest reports of a period")
def recent_reports(
    request: Request, who: Who, period: Period, count: Annotated[int, Query(ge=1, le=200)] = 24
) -> dict[str, Any]:
    return {"reports": _ops(request).reports.recent(period, count)}
