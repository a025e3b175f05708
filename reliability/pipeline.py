"""The life of one delivery of a ``ReliableTask`` (DESIGN §4), in one visible order.

1. context: task id, name, attempt, correlation id, tenant bound to every log line;
2. local checks (no Redis): an unreadable or passed deadline, arguments that fail the
   task's ``args_model`` -> dead letter;
3. admission, one Lua call for every guard that takes part (delivery record on
   redelivery, defer id on a parked copy, idempotency lease when keyed); a delivery
   needing none of them costs no round trip;
4. the body, under Celery's time limits (shortened to the deadline by the request);
5. the outcome, one more Lua call: success records the result, closes the lease and
   the delivery and appends the ledger; a failure is retried by parking the message
   (policy delay, fleet-wide retry budget) or dead-lettered, never both, never neither.

Deliberate control flow (defer, skip, dead-letter) ends in Celery's own ``Ignore`` /
``Retry`` or in the task's failure, so Flower and result backends see the truth.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import TYPE_CHECKING, Any

import structlog
from celery.exceptions import Ignore, Reject, Retry
from pydantic import ValidationError

from reliability import admission, idempotency, metrics, ratelimit
from reliability import breaker as breaker_mod
from reliability.admission import Part, Verdict
from reliability.deadline import remaining_seconds, validate_deadline
from reliability.deferral import ParkedMessage
from reliability.delivery import (
    RESERVED,
    Delivery,
    activate,
    deactivate,
)
from reliability.dlq import FailureClass
from reliability.errors import (
    DeadlineExceeded,
    IdempotencyConflict,
    PoisonMessage,
)
from reliability.ledger import Outcome
from reliability.runtime import Runtime, get_runtime
from reliability.settlement import Settlement, is_settled, settled

if TYPE_CHECKING:
    from reliability.task import ReliableTask

log = structlog.get_logger("reliability.pipeline")


class RetryRequested(Exception):
    """Raised by ``ReliableTask.retry``: another attempt, after ``countdown`` if given."""

    def __init__(self, exc: BaseException | None, countdown: float | None) -> None:
        super().__init__(str(exc) if exc else "retry requested")
        self.exc = exc
        self.countdown = countdown


TASK_CONTEXT_KEYS = ("task_id", "task_name", "attempt", "correlation_id", "tenant_id")


def clear_task_context() -> None:
    """Unbind the log context a delivery bound (called on Celery's ``task_postrun``)."""
    structlog.contextvars.unbind_contextvars(*TASK_CONTEXT_KEYS)


def pipeline_for(task: ReliableTask) -> Pipeline:
    found = task.__dict__.get("_reliable_pipeline")
    if found is None:
        found = Pipeline(task)
        task.__dict__["_reliable_pipeline"] = found
    return found


class Pipeline(Settlement):
    """Runs deliveries of one task through the guards."""

    def __init__(self, task: ReliableTask) -> None:
        self.task = task
        self.signature = inspect.signature(task.run)
        self._limits: list[ratelimit.RateLimit] | None = None

    # -- entry -------------------------------------------------------------------------

    def execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rt = get_runtime()
        d = Delivery.from_request(self.task.request, self.task.name, args, kwargs)
        if d.first_attempt_at is None:
            d.first_attempt_at = time.time()
        context = {"task_id": d.task_id, "task_name": d.name, "attempt": d.attempt,
                   "correlation_id": d.correlation_id}
        if d.tenant_id:
            context["tenant_id"] = d.tenant_id
        token = activate(d)
        # Bound until task_postrun (see clear_task_context), so Celery's own lines about
        # this delivery (succeeded, retry, raised) carry the task and correlation ids too.
        clear_task_context()
        structlog.contextvars.bind_contextvars(**context)
        try:
            return self._execute(rt, d)
        except (Ignore, Reject, Retry):
            raise
        except Exception as exc:
            if not is_settled(exc):
                # The pipeline's own code failed, not the body: never ack it unrecorded.
                self.dead_letter(rt, d, FailureClass.POISON, exc=exc, ran=False,
                                 reason=f"internal error handling the delivery: {exc!r}")
            raise
        finally:
            deactivate(token)

    def _execute(self, rt: Runtime, d: Delivery) -> Any:
        self._check_locally(rt, d)
        verdict = self._admit(rt, d)
        if not verdict.runs:
            return self._refused(rt, d, verdict)
        d.fence = verdict.fence
        d.admitted_at = verdict.now or None
        if d.idempotency_key:
            log.debug("idempotency_lock_acquired", idempotency_key=d.idempotency_key, fence=d.fence)
        # Its leases (idempotency, a half-open trial slot, concurrency places) are renewed
        # by the worker's main process while this process lives (reliability.lease): a
        # body holding the GIL cannot starve them.
        started = time.monotonic()
        try:
            result = self.task.run(*d.args, **d.kwargs)
        except RetryRequested as request:
            error = request.exc or RuntimeError("retry requested by the task")
            d.duration = time.monotonic() - started
            return self._failed(rt, d, error, countdown=request.countdown)
        except Retry as request:
            # Celery's own retry raised by the body: the policy's retry, parked.
            d.duration = time.monotonic() - started
            when = request.when if isinstance(request.when, int | float) else None
            return self._failed(rt, d, request.exc or request, countdown=when)
        except (Ignore, Reject) as control:
            d.duration = time.monotonic() - started
            self._given_up(rt, d, control)
            raise
        except Exception as exc:
            d.duration = time.monotonic() - started
            return self._failed(rt, d, exc)
        d.duration = time.monotonic() - started
        return self._succeeded(rt, d, result)

    # -- 2. local checks ------------------------------------------------------------------

    def _check_locally(self, rt: Runtime, d: Delivery) -> None:
        unreadable = validate_deadline(d.deadline_header)
        if unreadable:
            self.dead_letter(rt, d, FailureClass.POISON, reason=unreadable, ran=False)
            raise settled(PoisonMessage(unreadable))
        left = remaining_seconds(d.deadline)
        if left is not None and left <= 0:
            reason = f"deadline {d.deadline_header} passed {-left:.3f}s before the task started"
            self.dead_letter(rt, d, FailureClass.EXPIRED, reason=reason, ran=False)
            raise settled(DeadlineExceeded(reason))
        try:
            self.signature.bind(*d.args, **d.kwargs)
        except TypeError as exc:
            reason = f"arguments do not fit the task's signature: {exc}"
            self.dead_letter(rt, d, FailureClass.POISON, reason=reason, ran=False)
            raise settled(PoisonMessage(reason)) from None
        model = self.task.args_model
        arguments = None
        if model is not None:
            arguments = idempotency.bind_arguments(self.signature, d.args, d.kwargs)
            try:
                model.model_validate(arguments)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                    for e in exc.errors(include_url=False, include_input=False)
                )
                reason = f"invalid arguments: {problems}"
                self.dead_letter(rt, d, FailureClass.POISON, reason=reason, ran=False)
                raise settled(PoisonMessage(reason)) from None
        self.identify(d, arguments)

    def identify(self, d: Delivery, arguments: dict[str, Any] | None = None) -> None:
        """Set the delivery's idempotency key and fingerprint when the task is keyed."""
        if self.task.keyed or d.idempotency_header:
            if arguments is None:
                arguments = idempotency.bind_arguments(self.signature, d.args, d.kwargs)
            d.fingerprint = idempotency.fingerprint(arguments)
            d.idempotency_key = idempotency.derive_key(
                d.name, arguments, d.idempotency_header, self.task.idempotency_key_args,
                fp=d.fingerprint,
            )

    # -- 3. admission ---------------------------------------------------------------------

    def _admit(self, rt: Runtime, d: Delivery) -> Verdict:
        keys = rt.store.keys
        cfg = rt.config
        tag = self.task.tag
        parts: list[Part] = []
        if d.redelivered:
            parts.append(Part(admission.DELIVERY, [self._delivery_key(rt, d)],
                              [cfg.max_redeliveries]))
        if d.defer_id:
            parts.append(Part(admission.DEFER, [keys.defer(tag, d.defer_id)],
                              [d.publish_id or "", self._delivery_ttl_ms(rt)]))
        if d.idempotency_key:
            parts.append(Part(
                idempotency.FRAGMENT,
                [self._idem_key(rt, d), keys.leases],
                [d.fingerprint, d.owner, self._lease_seconds(rt), self._result_ttl(rt),
                 d.delivery_tag],
            ))
        if self.task.breaker:
            breaker_keys, breaker_args = self.breaker(rt).admission_args(d.owner)
            parts.append(Part(breaker_mod.FRAGMENT, breaker_keys, breaker_args))
        limits = self.limits(rt)
        if limits:
            limit_keys, limit_args = ratelimit.admission_args(
                rt.store, d.name, limits, d.owner, d.tenant_id, lambda: self._arguments(d))
            parts.append(Part(ratelimit.fragment(len(limits), d.reserved), limit_keys,
                              limit_args))
        if not parts:
            return Verdict("run")
        fragments, part_keys, part_args = admission.flatten(parts)
        script = admission.assemble(fragments)
        reply = self._store(rt, "admission", lambda: rt.store.run(
            script,
            [keys.ledger, *part_keys],
            ["", cfg.ledger_max_len, d.task_id, d.name, d.attempt, self._delivery_ttl_ms(rt),
             *part_args],
            "admission",
        ))
        return admission.parse(reply)

    def _refused(self, rt: Runtime, d: Delivery, verdict: Verdict) -> Any:
        decision = verdict.decision
        if decision == "done":
            log.info("task_skipped_idempotent", idempotency_key=d.idempotency_key)
            metrics.OUTCOMES.labels(d.name, Outcome.SKIPPED).inc()
            return json.loads(verdict.detail) if verdict.detail else None
        if decision == "duplicate":
            log.info("task_duplicate_delivery_skipped", settled_as=verdict.detail)
            metrics.OUTCOMES.labels(d.name, Outcome.DUPLICATE_DELIVERY).inc()
            raise Ignore()
        if decision == "busy":
            delay = min(rt.config.recheck_seconds, max(float(verdict.detail), 0.05))
            message = ParkedMessage.of(d, retries=d.retries, reason="idempotency key in progress",
                                       extra_headers=self._carried_headers(d, True))
            self._park(rt, d, message, delay, mode="defer", outcome=Outcome.DEFERRED,
                       detail="in_progress")
            log.info("task_deferred_in_progress", idempotency_key=d.idempotency_key,
                     recheck_in=round(delay, 3))
            raise Ignore()
        if decision in ("breaker_open", "breaker_busy"):
            return self._breaker_refused(rt, d, decision, float(verdict.detail))
        if decision in ("limit_delay", "limit_busy"):
            # A copy keeps its reserved slot through the start gate and a full
            # concurrency limit; only a first delivery's "busy" reserved nothing.
            reserved = decision == "limit_delay" or d.reserved
            delay = float(verdict.detail)
            extra = {**self._carried_headers(d), **({RESERVED: 1} if reserved else {})}
            message = ParkedMessage.of(d, retries=d.retries, reason=decision, extra_headers=extra)
            self._park(rt, d, message, delay, mode="defer", outcome=Outcome.DEFERRED,
                       detail=decision)
            log.info("tokens_waiting", wait_seconds=round(delay, 3), reserved=reserved,
                     limit=verdict.extra[0] if verdict.extra else None)
            raise Ignore()
        if decision == "conflict":
            reason = f"idempotency key {d.idempotency_key} holds different arguments"
            self.dead_letter(rt, d, FailureClass.CONFLICT, reason=reason, ran=False)
            raise settled(IdempotencyConflict(reason))
        if decision == "poison":
            reason = (f"redelivered {verdict.detail} times"
                      f" (max redeliveries {rt.config.max_redeliveries})")
            self.dead_letter(rt, d, FailureClass.POISON, reason=reason, ran=False)
            raise settled(PoisonMessage(reason))
        raise RuntimeError(f"unknown admission verdict {decision!r}")

    def _breaker_refused(self, rt: Runtime, d: Delivery, decision: str, wait: float) -> Any:
        """Open breaker: the fallback serves the call, or the task waits, attempt unspent."""
        name = self.task.breaker
        log.info("circuit_breaker_rejected_call", breaker=name, reason=decision,
                 retry_in=round(wait, 3))
        fallback = self.task.breaker_fallback
        if fallback is not None:
            try:
                value = fallback(*d.args, **d.kwargs)
            except Exception as exc:
                # The fallback failed: settle it as the call's failure (retry or DLQ).
                return self._failed(rt, d, exc)
            self._store(rt, "ledger", lambda: rt.ledger.record(
                d.task_id, d.name, Outcome.FALLBACK, d.attempt, f"breaker {name} {decision}"))
            metrics.OUTCOMES.labels(d.name, Outcome.FALLBACK).inc()
            log.info("circuit_breaker_fallback_served", breaker=name)
            return value
        if decision == "breaker_busy":
            # Trial slots free when a trial ends, usually long before their lease expires.
            wait = min(wait, rt.config.recheck_seconds)
        message = ParkedMessage.of(d, retries=d.retries, reason=decision,
                                   extra_headers=self._carried_headers(d, True))
        self._park(rt, d, message, wait, mode="defer", outcome=Outcome.DEFERRED, detail=decision)
        raise Ignore()
