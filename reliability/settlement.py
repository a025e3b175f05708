"""Settling a delivery: every way a delivery that was admitted (or refused) ends.

Success writes the completion record — fused into Celery's result write when the
backend allows (:mod:`reliability.backend`), else in its own script — before the ack.
A failure is retried by parking the message (policy delay, fleet-wide retry budget) or
dead-lettered, never both, never neither; either way the breaker hears of it and
concurrency places are freed (the guards' settle tail). The worker's parent uses the
same methods for the endings only it sees (hard time limit, lost child, revoke).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
from celery.app.task import get_actual_ignore_result
from celery.exceptions import Ignore, Reject, Retry

from reliability import breaker as breaker_mod
from reliability import idempotency, metrics, ratelimit, scripts
from reliability.deferral import ParkedMessage
from reliability.delivery import FIRST_ATTEMPT_AT, PREVIOUS_DELAY, RESERVED, Delivery
from reliability.dlq import DeadLetter, FailureClass
from reliability.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    IdempotencyConflict,
    PermanentError,
    PoisonMessage,
    StaleFencingToken,
)
from reliability.lease import Holding
from reliability.ledger import Outcome
from reliability.runtime import Runtime, get_runtime
from reliability.sensitive import changed_arguments

if TYPE_CHECKING:
    import inspect

    from reliability.task import ReliableTask

log = structlog.get_logger("reliability.pipeline")


class Completion:
    """A successful delivery's completion record, written once before the ack."""

    def __init__(self, pipeline: Settlement, delivery: Delivery, keys: list[str],
                 args: list[Any], tail: tuple[list[str], list[Any]] = ([], [])) -> None:
        self.pipeline = pipeline
        self.delivery = delivery
        self.keys = keys
        self.args = args
        self.tail = tail

    def write(self, rt: Runtime, script: str = scripts.COMPLETE,
              extra_keys: Sequence[Any] = (), extra_args: Sequence[Any] = ()) -> str:
        """Run the completion script (plus anything fused into it); returns the outcome."""
        d = self.delivery
        tail_keys, tail_args = self.tail
        outcome = str(self.pipeline._store(rt, "completion", lambda: rt.store.run(
            script, [*self.keys, *extra_keys, *tail_keys], [*self.args, *extra_args, *tail_args],
            "completion",
        )))
        metrics.OUTCOMES.labels(d.name, outcome).inc()
        if outcome == Outcome.SUPERSEDED:
            log.warning("idempotency_fence_superseded", idempotency_key=d.idempotency_key,
                        fence=d.fence)
        return outcome


# How long a store operation waits for an unreachable store (None: the runtime's
# setting). The worker's parent settles endings on its consumer thread, which must not
# stall for long: it sets a short wait (see reliability.request).
store_wait: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "reliable_store_wait", default=None)


# Completions waiting to be fused into the result write, by task id (per thread).
_pending_local = threading.local()


class _Pending:
    def __setitem__(self, task_id: str, completion: Completion) -> None:
        _pending_local.__dict__.setdefault("items", {})[task_id] = completion

    def take(self, task_id: str) -> Completion | None:
        return _pending_local.__dict__.setdefault("items", {}).pop(task_id, None)


_pending = _Pending()


def take_pending(task_id: str) -> Completion | None:
    """The completion the result backend should write with this task's result."""
    return _pending.take(task_id)


def flush_pending(task_id: str) -> None:
    """Write a completion the backend did not take (no result stored): still before ack."""
    completion = _pending.take(task_id)
    if completion is not None:
        completion.write(get_runtime())


def _result_json(result: Any) -> str:
    """The result as stored under the idempotency key (a repr when JSON cannot hold it)."""
    try:
        return json.dumps(result, default=str)
    except (TypeError, ValueError):
        return json.dumps(repr(result))


def classify(exc: BaseException, retryable: bool) -> FailureClass:
    if isinstance(exc, IdempotencyConflict):
        return FailureClass.CONFLICT
    if isinstance(exc, PoisonMessage):
        return FailureClass.POISON
    if isinstance(exc, DeadlineExceeded):
        return FailureClass.EXPIRED
    return FailureClass.TRANSIENT if retryable else FailureClass.PERMANENT


_SETTLED = "_reliable_settled"


def settled(exc: BaseException) -> BaseException:
    """Mark an exception whose delivery already has its outcome recorded (DLQ entry)."""
    with contextlib.suppress(AttributeError):
        setattr(exc, _SETTLED, True)
    return exc


def is_settled(exc: BaseException) -> bool:
    return bool(getattr(exc, _SETTLED, False))


class Settlement:
    """The outcome half of :class:`~reliability.pipeline.Pipeline` (a mixin)."""

    task: ReliableTask
    signature: inspect.Signature
    _limits: list[ratelimit.RateLimit] | None


    def _succeeded(self, rt: Runtime, d: Delivery, result: Any) -> Any:
        keys = rt.store.keys
        cfg = rt.config
        completion = Completion(
            pipeline=self,
            delivery=d,
            keys=[self._idem_key(rt, d) if d.idempotency_key else "", keys.leases,
                  self._delivery_key(rt, d), keys.ledger, keys.budget(self.task.tag)],
            args=["", d.owner, str(d.fence), _result_json(result),
                  self._result_ttl(rt), self._delivery_ttl_ms(rt), cfg.ledger_max_len,
                  d.task_id, d.name, d.attempt, cfg.budget_window_seconds],
            tail=self.guard_tail(rt, d, None),
        )
        request = self.task.request
        if (getattr(self.task.backend, "fuses_completion", False)
                and not get_actual_ignore_result(self.task, request)
                # Callbacks and chain steps are published before the result is stored: a
                # fused write that then fails would publish them twice on redelivery.
                and not request.callbacks and not request.chain):
            # Written together with Celery's result, in the backend's one round trip,
            # still before the ack (see reliability.backend).
            _pending[d.task_id] = completion
            return result
        if completion.write(rt) == Outcome.SUPERSEDED:
            raise Ignore()
        return result

    def _failed(self, rt: Runtime, d: Delivery, exc: BaseException,
                countdown: float | None = None) -> Any:
        if isinstance(exc, StaleFencingToken) and d.fence:
            return self._superseded(rt, d, exc)
        decision, delay = self.settle_failure(rt, d, exc, countdown=countdown, ran=True)
        settled(exc)
        # Celery stores the exception (and its traceback, causes included) in the result
        # backend and logs it: no secret in any of it.
        rt.masker.exception(exc)
        if decision == Outcome.RETRIED:
            raise Retry(exc=exc, when=delay)
        raise exc

    def _given_up(self, rt: Runtime, d: Delivery, control: Ignore | Reject) -> None:
        """The body raised Celery's Ignore or Reject itself: record what becomes of it."""
        self._release(rt, d)
        self._store(rt, "release guards", lambda: self.release_guards(rt, d))
        if isinstance(control, Reject) and not control.requeue:
            self.dead_letter(rt, d, FailureClass.PERMANENT, ran=False,
                             reason=f"rejected by the task: {control.reason!r}")
            return
        outcome, detail = ((Outcome.REQUEUED, "rejected by the task, requeued")
                           if isinstance(control, Reject) else
                           (Outcome.REVOKED, "ignored by the task"))
        self._store(rt, "ledger", lambda: rt.ledger.record(
            d.task_id, d.name, outcome, d.attempt, detail))
        metrics.OUTCOMES.labels(d.name, outcome).inc()
        log.warning("task_given_up_by_body", settled_as=str(outcome), detail=detail)

    def _superseded(self, rt: Runtime, d: Delivery, exc: StaleFencingToken) -> Any:
        """The provider saw a newer fence: a successor owns the key (and settles it).

        Not a failure of the work, so no retry and no DLQ entry: only a ledger record.
        """
        self._store(rt, "release guards", lambda: self.release_guards(rt, d))
        self._store(rt, "superseded", lambda: rt.ledger.record(
            d.task_id, d.name, Outcome.SUPERSEDED, d.attempt, type(exc).__name__))
        metrics.OUTCOMES.labels(d.name, Outcome.SUPERSEDED).inc()
        log.warning("idempotency_fence_superseded", idempotency_key=d.idempotency_key,
                    fence=d.fence, error=rt.masker.text(str(exc)))
        raise Ignore()

    def settle_failure(self, rt: Runtime, d: Delivery, exc: BaseException, *,
                       countdown: float | None = None, ran: bool = True
                       ) -> tuple[Outcome, float | None]:
        """Park the message for another attempt, or dead-letter it: exactly one of them.

        Used by the pool child after the body failed, and by the worker's parent when the
        child hit its hard time limit.
        """
        policy = self.task.retry_policy or rt.config.retry_policy
        first = d.first_attempt_at or time.time()
        if countdown is not None:
            delay: float | None = countdown if d.attempt < policy.max_attempts else None
        else:
            delay = policy.decide(d.attempt, exc, time.time() - first, d.previous_delay)
        if delay is None:
            retryable = policy.is_retryable(exc) and not isinstance(exc, PermanentError)
            failure = classify(exc, retryable)
            self.dead_letter(rt, d, failure, exc=exc, ran=ran)
            return Outcome.DEAD_LETTERED, None
        message = ParkedMessage.of(
            d, retries=d.retries + 1, reason=f"retry after {type(exc).__name__}",
            extra_headers={**self._carried_headers(d), FIRST_ATTEMPT_AT: first,
                           PREVIOUS_DELAY: delay},
        )
        reply = self._park(rt, d, message, delay, mode="retry", outcome=Outcome.RETRIED,
                           detail=type(exc).__name__, tail=self.guard_tail(rt, d, exc))
        if reply[0] == "refused":
            self.dead_letter(rt, d, FailureClass.RETRY_BUDGET_EXHAUSTED, exc=exc, ran=False)
            return Outcome.DEAD_LETTERED, None
        metrics.OUTCOMES.labels(d.name, Outcome.RETRIED).inc()
        log.warning("task_retry_scheduled", delay_seconds=round(delay, 3),
                    error_type=type(exc).__name__, error=rt.masker.text(str(exc)))
        return Outcome.RETRIED, delay

    def _park(self, rt: Runtime, d: Delivery, message: ParkedMessage, delay: float, *,
              mode: str, outcome: Outcome, detail: str,
              tail: tuple[list[str], list[Any]] = ([], [])) -> list[Any]:
        keys = rt.store.keys
        cfg = rt.config
        return self._store(rt, "park", lambda: rt.store.run(
            scripts.PARK,
            # Release only a lease this delivery holds (a deferral holds none).
            [self._idem_key(rt, d) if d.idempotency_key and d.fence else "", keys.leases,
             self._delivery_key(rt, d), keys.ledger, keys.budget(self.task.tag),
             keys.parked, keys.parked_msgs, *tail[0]],
            ["", d.owner, str(d.fence) if d.fence else "", mode, cfg.budget_window_seconds,
             cfg.budget_ratio, cfg.budget_min_retries_per_second, message.id, delay,
             message.to_json(), self._delivery_ttl_ms(rt), cfg.ledger_max_len, d.task_id,
             d.name, d.attempt, str(outcome), detail, *tail[1]],
            "park",
        ))

    def dead_letter(self, rt: Runtime, d: Delivery, failure: FailureClass, *,
                     exc: BaseException | None = None, reason: str = "", ran: bool) -> None:
        keys = rt.store.keys
        cfg = rt.config
        # Sensitive arguments whole; their values wherever else they appear (the
        # exception message, the traceback), as configured secrets and patterns are.
        sensitive = self.task.sensitive
        masker = rt.masker.including(sensitive.values(d.args, d.kwargs))
        args, kwargs = masker.call(d.args, d.kwargs, sensitive)
        masked_args = changed_arguments(list(self.signature.parameters), d.args, d.kwargs,
                                        args, kwargs)
        now = time.time()
        entry = DeadLetter(
            task_name=d.name,
            task_id=d.task_id,
            failure_class=str(failure),
            reason=masker.text(reason or (str(exc) if exc else "")),
            args=args,
            kwargs=kwargs,
            idempotency_key=d.idempotency_key,
            correlation_id=d.correlation_id,
            tenant_id=d.tenant_id,
            exception_type=type(exc).__name__ if exc else None,
            exception_message=masker.text(str(exc)) if exc else None,
            traceback=masker.text("".join(traceback.format_exception(exc))) if exc else None,
            attempts=d.attempt,
            first_failure_at=d.first_attempt_at or now,
            last_failure_at=now,
            redrive_count=d.redrive_count,
            headers=masker.data(d.producer_headers()),
            routing=d.routing,
            masked_args=masked_args,
        )
        holds = bool(d.idempotency_key and d.fence)
        tail_keys, tail_args = self.guard_tail(rt, d, exc) if ran else ([], [])
        evicted = self._store(rt, "dead_letter", lambda: rt.store.run(
            scripts.DEAD_LETTER,
            [self._idem_key(rt, d) if holds else "", keys.leases, self._delivery_key(rt, d),
             keys.ledger, keys.budget(self.task.tag) if ran else "", keys.dlq, keys.dlq_index,
             *tail_keys],
            ["", d.owner if holds else "", str(d.fence), cfg.budget_window_seconds, entry.id,
             entry.to_json(), cfg.dlq_max_entries, self._delivery_ttl_ms(rt), cfg.ledger_max_len,
             d.task_id, d.name, d.attempt, str(failure), *tail_args],
            "dead_letter",
        ))
        metrics.DEAD_LETTERS.labels(d.name, str(failure)).inc()
        metrics.OUTCOMES.labels(d.name, Outcome.DEAD_LETTERED).inc()
        log.error("task_dead_lettered", failure_class=str(failure), dlq_id=entry.id,
                  reason=entry.reason, error_type=entry.exception_type)
        if evicted:
            metrics.DLQ_EVICTIONS.inc(int(evicted))
            log.warning("dlq_evicted_oldest", count=int(evicted), max_entries=cfg.dlq_max_entries)

    def _release(self, rt: Runtime, d: Delivery) -> None:
        if d.idempotency_key and d.fence:
            self._store(rt, "release", lambda: self.release(rt, d))
            log.info("idempotency_lock_released_on_error", idempotency_key=d.idempotency_key)

    def release(self, rt: Runtime, d: Delivery) -> bool:
        """Release the delivery's lease (any fence of its owner when ``d.fence`` is 0)."""
        return bool(rt.store.run(
            scripts.RELEASE, [self._idem_key(rt, d), rt.store.keys.leases],
            ["", d.owner, str(d.fence) if d.fence else ""], "release",
        ))

    # -- helpers --------------------------------------------------------------------------

    def breaker(self, rt: Runtime) -> breaker_mod.CircuitBreaker:
        return rt.breakers.get(self.task.breaker or "")

    def limits(self, rt: Runtime) -> list[ratelimit.RateLimit]:
        if self._limits is None:
            self._limits = [x if isinstance(x, ratelimit.RateLimit) else rt.rate_limit(x)
                            for x in self.task.rate_limits]
        return self._limits

    def _arguments(self, d: Delivery) -> dict[str, Any]:
        return idempotency.bind_arguments(self.signature, d.args, d.kwargs)

    def release_guards(self, rt: Runtime, d: Delivery) -> None:
        """Free what the delivery holds in its guards (a breaker trial slot, concurrency
        places) without judging the call: it ended without an outcome (lost child,
        superseded, given up by the task)."""
        keys, args = self.guard_tail(rt, d, None, outcome="ignore")
        if keys:
            rt.store.run(scripts.SETTLE_GUARDS, keys, ["", *args], "release guards")

    def guard_tail(self, rt: Runtime, d: Delivery, error: BaseException | None,
                   outcome: str | None = None) -> tuple[list[str], list[Any]]:
        """KEYS/ARGV tail settling the breaker and concurrency limits of a call that ran."""
        concurrency = [x for x in self.limits(rt) if x.kind == "concurrency"]
        if not self.task.breaker and not concurrency:
            return [], []
        keys: list[str] = []
        args: list[Any] = [d.owner, 1 if self.task.breaker else 0]
        if self.task.breaker:
            breaker = self.breaker(rt)
            keys.extend(breaker.keys)
            args.extend(breaker.settle_args(error, d.duration, outcome))
        args.append(len(concurrency))
        for limit in concurrency:
            scope = limit.scope_value(d.name, d.tenant_id, lambda: self._arguments(d))
            keys.append(ratelimit.limit_keys(rt.store, limit, scope)[0])
        return keys, args

    def holding(self, rt: Runtime, d: Delivery) -> Holding:
        """What a running delivery of this task holds, for the worker's lease keeper: its
        idempotency lease, a breaker trial slot, its concurrency places."""
        places = []
        for limit in self.limits(rt):
            if limit.kind == "concurrency":
                scope = limit.scope_value(d.name, d.tenant_id, lambda: self._arguments(d))
                places.append((ratelimit.limit_keys(rt.store, limit, scope)[0],
                               float(limit.lease_seconds)))
        breaker = self.breaker(rt) if self.task.breaker else None
        return Holding(
            owner=d.owner,
            pid=None,
            idempotency_key=self._idem_key(rt, d) if d.idempotency_key else None,
            lease_seconds=self._lease_seconds(rt),
            trial_key=breaker.keys[2] if breaker is not None else None,
            trial_seconds=breaker.config.trial_lease_seconds if breaker is not None else 60.0,
            places=places,
        )

    def _store(self, rt: Runtime, operation: str, fn: Any) -> Any:
        """Run a store operation; if the store stays away, hand the message back unacked."""
        try:
            return rt.wait_for_store(operation, fn, seconds=store_wait.get())
        except BackendUnavailable as exc:
            log.error("task_requeued_store_unavailable", operation=operation, error=str(exc))
            raise Reject(exc, requeue=True) from exc

    def _carried_headers(self, d: Delivery, keep_reservation: bool = False
                         ) -> dict[str, Any]:
        # A copy deferred again (not retried: a retry is a new call) keeps its reserved
        # rate-limit slot; the start gate still applies to it.
        carried: dict[str, Any] = {RESERVED: 1} if keep_reservation and d.reserved else {}
        if d.first_attempt_at is not None:
            carried[FIRST_ATTEMPT_AT] = d.first_attempt_at
        if d.previous_delay is not None:
            carried[PREVIOUS_DELAY] = d.previous_delay
        return carried

    def _idem_key(self, rt: Runtime, d: Delivery) -> str:
        return rt.store.keys.idem(self.task.tag, d.idempotency_key or "")

    def _delivery_key(self, rt: Runtime, d: Delivery) -> str:
        return rt.store.keys.delivery(self.task.tag, d.task_id, d.retries, d.publish_id or "0")

    def _lease_seconds(self, rt: Runtime) -> float:
        return self.task.lease_ttl or rt.config.lease_seconds

    def _result_ttl(self, rt: Runtime) -> int:
        return int(self.task.idempotency_ttl or rt.config.result_ttl_seconds)

    def _delivery_ttl_ms(self, rt: Runtime) -> int:
        return int(rt.config.delivery_ttl_seconds * 1000)
