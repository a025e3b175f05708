"""The endings only the worker's parent sees, settled before Celery acks or requeues.

A hard time limit (the child is killed), a lost child (SIGKILL, OOM), a child killed at
shutdown, a revoked or expired message: the pool child never runs task code for them,
so the parent settles them with the same :class:`~reliability.settlement.Settlement`
as the pipeline — on its consumer thread, so with a short wait for an unreachable store,
after which the message is handed back unacked. :func:`running_deliveries` tells the
lease keeper what the parent's children hold.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from celery.exceptions import Reject, TimeLimitExceeded
from celery.worker.state import active_requests

from reliability.delivery import REQUEST_OWNER, Delivery
from reliability.dlq import FailureClass
from reliability.errors import BackendUnavailable, DeadlineExceeded
from reliability.guard import Call
from reliability.lease import Holding, Running
from reliability.ledger import Outcome
from reliability.pipeline import GUARDS, call_for
from reliability.runtime import runtime_of
from reliability.settlement import Settlement

log = structlog.get_logger("reliability.request")
# The parent settles on its consumer thread: it waits this long for the store, then
# hands the message back unacked.
PARENT_STORE_WAIT_SECONDS = 2.0
PARENT = Settlement(GUARDS, wait=PARENT_STORE_WAIT_SECONDS)


def call_of(request: Any) -> Call:
    """A Celery request's delivery as the guards see it (keyed as the pool child keys it)."""
    task = request.task
    d = Delivery.from_request(request.request_dict, task.name, request.args, request.kwargs)
    return call_for(task.spec, runtime_of(task.app), d)


def holding_of(request: Any) -> Holding:
    """What a running delivery holds, for the lease keeper (built on its thread)."""
    call = call_of(request)
    holding = Holding(owner=call.d.owner, pid=None)
    for guard in GUARDS:
        guard.hold(call, holding)
    return holding


def settle(request: Any, ending: Callable[..., Any], *args: Any) -> bool:
    """Run a parent-side settlement; False if the store is away (the caller then hands the
    message back unacked instead of acking it)."""
    try:
        ending(request, *args)
    except (BackendUnavailable, Reject) as exc:
        log.error("task_ending_unrecorded_requeued", task_id=request.id, error=str(exc))
        return False
    return True


def hard_time_limit(request: Any, timeout: float) -> Outcome:
    """The child was killed at its hard limit: retry or dead-letter, as a failure."""
    call = call_of(request)
    PARENT.release(call)
    outcome, delay = PARENT.failure(
        call, TimeLimitExceeded(f"hard time limit ({timeout}s) exceeded"), ran=True
    )
    log.warning(
        "task_hard_time_limit",
        task_id=request.id,
        task_name=request.name,
        settled_as=str(outcome),
        retry_in=delay,
    )
    return outcome


def requeued(
    request: Any, reason: str, detail: str, event: str = "task_child_lost_requeued"
) -> None:
    """The child died (or was killed at shutdown): free its lease and guards at once, so
    the redelivered copy need not wait, and record ``requeued``."""
    try:
        call = call_of(request)
        released = PARENT.release(call)
        PARENT.release_guards(call)
        PARENT.record(call, Outcome.REQUEUED, reason)
    except (BackendUnavailable, Reject) as error:
        # The lease lapses by itself within its TTL; the message is requeued anyway.
        log.error("lease_release_failed_child_lost", task_id=request.id, error=str(error))
        return
    log.warning(
        event, task_id=request.id, task_name=request.name, lease_released=released, error=detail
    )


def revoked(request: Any, reason: str, terminated: bool, expired: bool) -> None:
    """A revoked message is recorded ``revoked``; an expired one is dead-lettered."""
    call = call_of(request)
    if terminated:
        PARENT.release(call)
    if expired:
        PARENT.dead_letter(
            call,
            FailureClass.EXPIRED,
            exc=DeadlineExceeded(f"message expired before it ran ({reason})"),
            ran=False,
        )
        return
    PARENT.record(call, Outcome.REVOKED, reason)
    log.warning(
        "task_revoked",
        task_id=request.id,
        task_name=request.name,
        reason=reason,
        terminated=terminated,
    )


def running_deliveries() -> Iterable[Running]:
    """The reliable deliveries running in this worker now, for the lease keeper."""
    wall, mono = time.time(), time.monotonic()
    for request in tuple(active_requests):
        task = getattr(request, "task", None)
        if getattr(task, "spec", None) is None or request.acknowledged:
            continue
        owner = request.request_dict.get(REQUEST_OWNER) or request.id
        started = request.time_start
        yield Running(
            str(owner),
            request.worker_pid,
            None if not started else mono - (wall - started),
            functools.partial(holding_of, request),
        )
