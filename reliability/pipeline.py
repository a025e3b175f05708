"""The life of one delivery of a ``ReliableTask`` (DESIGN §4), with its guards in one list.

``GUARDS`` is the order, and the only place it lives. For each delivery:

1. context: task id, name, attempt, correlation id, tenant bound to every log line;
2. local checks (no Redis): an unreadable or passed deadline, arguments that do not fit
   the signature or fail the task's ``args_model`` -> dead letter;
3. admission, one Lua call: every guard that takes part adds its fragment, in list order
   (a delivery needing none costs no round trip); a refusal is handled by the guard whose
   verdict it is, as an :data:`~reliability.guard.Action` the pipeline carries out;
4. the body, under Celery's time limits (shortened to the deadline by the request);
5. the outcome (:class:`~reliability.settlement.Settlement`): success records the result
   before the ack; a failure is retried by parking the message or dead-lettered, never
   both, never neither; every guard's settle tail runs in the same script.

Deliberate control flow (defer, skip, dead-letter) ends in Celery's own ``Ignore`` /
``Retry`` or in the task's failure, so Flower and result backends see the truth.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import structlog
from celery.app.task import get_actual_ignore_result  # type: ignore[attr-defined]
from celery.exceptions import Ignore, Reject, Retry

from reliability import admission, checks, completion, metrics
from reliability.breaker import Breaker
from reliability.deferral import Deferral, ParkedMessage
from reliability.degradation import Degradation
from reliability.delivery import (
    RESERVED,
    Delivery,
    Redelivery,
    activate,
    deactivate,
    delivery_ttl_ms,
)
from reliability.dlq import FailureClass
from reliability.errors import StaleFencingToken, is_settled, settled
from reliability.guard import Action, Call, DeadLetter, Duplicate, Fallback, Guard, Park, Skip
from reliability.idempotency import Idempotency
from reliability.ledger import Outcome
from reliability.logs import bind_task_context
from reliability.ratelimit import RateLimits
from reliability.runtime import Runtime
from reliability.settlement import Settlement
from reliability.spec import TaskSpec

log = structlog.get_logger("reliability.pipeline")

# The guards, in the order they decide. Adding a guard is one class and one entry here.
# Degradation after the idempotency check, before any commit, breaker or limit (its module).
GUARDS = (Redelivery(), Deferral(), Idempotency(), Degradation(), Breaker(), RateLimits())


class RetryRequested(Exception):
    """Raised by ``ReliableTask.retry``: another attempt, after ``countdown`` if given."""

    def __init__(self, exc: BaseException | None, countdown: float | None) -> None:
        super().__init__(str(exc) if exc else "retry requested")
        self.exc = exc
        self.countdown = countdown


class Body(Protocol):
    """What the pipeline needs of the Celery task whose delivery it runs."""

    name: str
    backend: Any

    @property
    def request(self) -> Any: ...

    def run(self, *args: Any, **kwargs: Any) -> Any: ...


def call_for(spec: TaskSpec, rt: Runtime, d: Delivery, guards: tuple[Guard, ...] = GUARDS) -> Call:
    """A delivery as the guards see it, prepared (keyed, ...) — also for the worker's
    parent, which settles the endings only it sees."""
    call = Call(spec, rt, d)
    for guard in guards:
        guard.prepare(call)
    return call


class Pipeline:
    """Runs deliveries of one task through the guards."""

    def __init__(self, spec: TaskSpec, rt: Runtime, guards: tuple[Guard, ...] = GUARDS) -> None:
        self.spec, self.rt, self.guards = spec, rt, guards
        self.settlement = Settlement(guards)

    def execute(self, task: Body, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        d = Delivery.from_request(task.request, self.spec.name, args, kwargs)
        if d.first_attempt_at is None:
            d.first_attempt_at = time.time()
        token = activate(d)
        bind_task_context(d)
        call = Call(self.spec, self.rt, d)
        try:
            return self._execute(task, call)
        except (Ignore, Reject, Retry):
            raise
        except Exception as exc:
            if not is_settled(exc):
                # The pipeline's own code failed, not the body: never ack it unrecorded.
                self.settlement.dead_letter(
                    call,
                    FailureClass.POISON,
                    exc=exc,
                    ran=False,
                    reason=f"internal error handling the delivery: {exc!r}",
                )
            raise
        finally:
            deactivate(token)

    def _execute(self, task: Body, call: Call) -> Any:
        self._check_locally(call)
        for guard in self.guards:
            guard.prepare(call)
        verdict = self._admit(call)
        if not verdict.runs:
            return self._act(task, call, self._owner(verdict.decision).refused(call, verdict))
        d = call.d
        d.fence = verdict.fence
        d.admitted_at = verdict.now or None
        for guard in self.guards:
            guard.admitted(call, verdict)
        # Its leases are renewed by the worker's main process while this process lives
        # (reliability.lease): a body holding the GIL cannot starve them.
        started = time.monotonic()
        try:
            result = self._body(task, d)
        except RetryRequested as request:
            d.duration = time.monotonic() - started
            return self._failed(
                call,
                request.exc or RuntimeError("retry requested by the task"),
                countdown=request.countdown,
            )
        except Retry as request:
            # Celery's own retry raised by the body: the policy's retry, parked.
            d.duration = time.monotonic() - started
            when = request.when if isinstance(request.when, int | float) else None
            return self._failed(call, request.exc or request, countdown=when)
        except (Ignore, Reject) as control:
            d.duration = time.monotonic() - started
            self._given_up(call, control)
            raise
        except Exception as exc:
            d.duration = time.monotonic() - started
            return self._failed(call, exc)
        d.duration = time.monotonic() - started
        return self._succeeded(task, call, result)

    @staticmethod
    def _body(task: Body, d: Delivery) -> Any:
        """Run the body, counted in ``reliable_tasks_running`` while it runs."""
        running = metrics.RUNNING.labels(d.name)
        running.inc()
        try:
            return task.run(*d.args, **d.kwargs)
        finally:
            running.dec()

    # -- local checks ---------------------------------------------------------------------

    def _check_locally(self, call: Call) -> None:
        problem = checks.problem(call)
        if problem is not None:
            self._refuse(call, *problem)

    def _refuse(
        self, call: Call, failure: FailureClass, reason: str, error: type[Exception]
    ) -> None:
        self.settlement.dead_letter(call, failure, reason=reason, ran=False)
        raise settled(error(reason)) from None

    # -- admission ----------------------------------------------------------------------

    def _admit(self, call: Call) -> admission.Verdict:
        parts = [part for guard in self.guards if (part := guard.part(call))]
        if not parts:
            return admission.Verdict("run")
        d, rt = call.d, call.rt
        script, keys, args = admission.layout(
            parts,
            ledger=rt.store.keys.ledger,
            ledger_max=rt.config.ledger_max_len,
            task_id=d.task_id,
            name=d.name,
            attempt=d.attempt,
            dlv_ttl_ms=delivery_ttl_ms(call),
        )
        reply = self.settlement.store(
            call, "admission", lambda: rt.store.run(script.source, keys, args, "admission")
        )
        return admission.parse(reply)

    def _owner(self, decision: str) -> Guard:
        """The guard whose verdict this is (the first in order that owns the value)."""
        for guard in self.guards:
            if guard.owns(decision):
                return guard
        raise RuntimeError(f"no guard owns the admission verdict {decision!r}")

    def _act(self, task: Body, call: Call, action: Action) -> Any:
        """Carry out what a guard decided for its verdict."""
        d = call.d
        if isinstance(action, Skip):
            return action.result
        if isinstance(action, Duplicate):
            raise Ignore()
        if isinstance(action, Park):
            headers = {**call.d.carried_headers(), **({RESERVED: 1} if action.reserved else {})}
            message = ParkedMessage.of(
                d, retries=d.retries, reason=action.detail, extra_headers=headers
            )
            self.settlement.park(
                call,
                message,
                action.delay,
                mode="defer",
                outcome=Outcome.DEFERRED,
                detail=action.detail,
            )
            raise Ignore()
        if isinstance(action, DeadLetter):
            self._refuse(call, FailureClass(action.failure_class), action.reason, action.error)
        assert isinstance(action, Fallback)
        try:
            value = action.fn(*d.args, **d.kwargs)
        except Exception as exc:
            # The fallback failed: settle it as the call's failure (retry or DLQ).
            return self._failed(call, exc)
        self.settlement.record(call, Outcome.FALLBACK, action.detail)
        log.info(action.event, **action.fields)
        return value

    # -- endings ------------------------------------------------------------------------

    def _succeeded(self, task: Body, call: Call, result: Any) -> Any:
        request = task.request
        if (
            getattr(task.backend, "fuses_completion", False)
            and not get_actual_ignore_result(task, request)
            # Callbacks and chain steps are published before the result is stored: a
            # fused write that then fails would publish them twice on redelivery.
            and not request.callbacks
            and not request.chain
        ):
            # Written together with Celery's result, in the backend's one round trip,
            # still before the ack (reliability.backend, reliability.completion).
            setattr(request, completion.PENDING, self.settlement.completion(call, result))
            return result
        return self.settlement.succeeded(call, result)

    def _failed(self, call: Call, exc: BaseException, countdown: float | None = None) -> Any:
        if isinstance(exc, StaleFencingToken) and call.d.fence:
            self._superseded(call, exc)
        decision, delay = self.settlement.failure(call, exc, countdown=countdown, ran=True)
        settled(exc)
        # Celery stores the exception (and its traceback, causes included) in the result
        # backend and logs it: no secret in any of it.
        call.rt.masker.exception(exc)
        if decision == Outcome.RETRIED:
            raise Retry(exc=exc, when=delay)  # type: ignore[arg-type]  # stubs: Exception, Real
        raise exc

    def _given_up(self, call: Call, control: Ignore | Reject) -> None:
        """The body raised Celery's Ignore or Reject itself: record what becomes of it."""
        if call.d.fence and self.settlement.release(call):
            log.info("idempotency_lock_released_on_error", idempotency_key=call.d.idempotency_key)
        self.settlement.release_guards(call)
        # Reject's attributes are set in __init__; the stubs leave them out.
        if isinstance(control, Reject) and not getattr(control, "requeue", False):
            reason = getattr(control, "reason", None)
            self.settlement.dead_letter(
                call, FailureClass.PERMANENT, ran=False, reason=f"rejected by the task: {reason!r}"
            )
            return
        outcome, detail = (
            (Outcome.REQUEUED, "rejected by the task, requeued")
            if isinstance(control, Reject)
            else (Outcome.REVOKED, "ignored by the task")
        )
        self.settlement.record(call, outcome, detail)
        log.warning("task_given_up_by_body", settled_as=str(outcome), detail=detail)

    def _superseded(self, call: Call, exc: StaleFencingToken) -> None:
        """The provider saw a newer fence: a successor owns the key (and settles it).

        Not a failure of the work, so no retry and no DLQ entry: only a ledger record.
        """
        self.settlement.release_guards(call)
        self.settlement.record(call, Outcome.SUPERSEDED, type(exc).__name__)
        log.warning(
            "idempotency_fence_superseded",
            idempotency_key=call.d.idempotency_key,
            fence=call.d.fence,
            error=call.rt.masker.text(str(exc)),
        )
        raise Ignore()
