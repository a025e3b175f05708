"""Settling a delivery: every way a delivery that was admitted (or refused) ends.

Success writes the completion record (:mod:`reliability.completion`) before the ack. A
failure is retried by parking the message (policy delay, fleet-wide retry budget) or
dead-lettered, never both, never neither; either way every guard's settle tail runs in
the same script (the breaker hears of the call, concurrency places are freed). The
worker's parent uses the same collaborator for the endings only it sees (hard time
limit, lost child, revoke), with a shorter wait for an unreachable store.

A :class:`Settlement` is built per delivery with what it needs passed in: the task's
spec, the runtime, the guard list, and how long to wait for the store before handing
the message back (Celery's ``Reject(requeue=True)``: nothing is acked unrecorded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from celery.exceptions import Ignore, Reject

from reliability import metrics
from reliability.completion import COMPLETE, Completion
from reliability.deadletter import classify, for_call
from reliability.deferral import PARK, ParkedMessage
from reliability.delivery import FIRST_ATTEMPT_AT, PREVIOUS_DELAY, delivery_key, delivery_ttl_ms
from reliability.dlq import DEAD_LETTER, FailureClass
from reliability.errors import BackendUnavailable, PermanentError
from reliability.guard import Call, Ending, Guard
from reliability.idempotency import RELEASE, idem_key
from reliability.ledger import Outcome, ran_for
from reliability.scripts import Part, Script

log = structlog.get_logger("reliability.pipeline")


def _requeue(exc: BackendUnavailable) -> None:
    raise Reject(exc, requeue=True) from exc


class Settlement:
    """The endings of one task's deliveries."""

    def __init__(self, guards: Sequence[Guard], *, wait: float | None = None) -> None:
        self.guards = guards
        self.wait = wait

    # -- store access -------------------------------------------------------------------

    def store(self, call: Call, operation: str, fn: Callable[[], Any]) -> Any:
        """Run a store operation; if the store stays away, hand the message back unacked."""
        return call.rt.stored(operation, fn, wait=self.wait, hand_back=_requeue)

    def run(
        self,
        call: Call,
        base: Script,
        keys: dict[str, str],
        args: dict[str, Any],
        operation: str,
        parts: Sequence[Part] = (),
    ) -> Any:
        """Run a settle script with the guards' tails bound after its own names."""
        script_ = base.extended(tuple(p.fragment for p in parts))
        key_list, arg_list = script_.layout(keys, args, parts)
        return self.store(
            call,
            operation,
            lambda: call.rt.store.run(script_.source, key_list, arg_list, operation),
        )

    def tails(self, call: Call, ending: Ending) -> list[Part]:
        """Every guard's settle tail for this ending, in guard order."""
        return [part for guard in self.guards if (part := guard.settle(call, ending))]

    # -- success ------------------------------------------------------------------------

    def completion(self, call: Call, result: Any) -> Completion:
        ending = Ending("success", None, call.d.duration, result)
        return Completion.of(
            call, result, self.tails(call, ending), lambda op, fn: self.store(call, op, fn)
        )

    def succeeded(self, call: Call, result: Any) -> Any:
        """Write the completion now (it is not fused with a result write)."""
        if self.completion(call, result).write(call.rt, COMPLETE) == Outcome.SUPERSEDED:
            raise Ignore()
        return result

    # -- failure ------------------------------------------------------------------------

    def failure(
        self, call: Call, exc: BaseException, *, countdown: float | None = None, ran: bool = True
    ) -> tuple[Outcome, float | None]:
        """Park the message for another attempt, or dead-letter it: exactly one of them.

        Used by the pool child after the body failed, and by the worker's parent when the
        child hit its hard time limit.
        """
        d, rt = call.d, call.rt
        policy = call.spec.option("retry_policy") or rt.config.retry_policy
        first = d.first_attempt_at or time.time()
        if countdown is not None:
            delay: float | None = countdown if d.attempt < policy.max_attempts else None
        else:
            delay = policy.decide(d.attempt, exc, time.time() - first, d.previous_delay)
        if delay is None:
            retryable = policy.is_retryable(exc) and not isinstance(exc, PermanentError)
            self.dead_letter(call, classify(exc, retryable), exc=exc, ran=ran)
            return Outcome.DEAD_LETTERED, None
        message = ParkedMessage.of(
            d,
            retries=d.retries + 1,
            reason=f"retry after {type(exc).__name__}",
            extra_headers={**d.carried_headers(), FIRST_ATTEMPT_AT: first, PREVIOUS_DELAY: delay},
        )
        ending = Ending("failure", exc, d.duration) if ran else None
        reply = self.park(
            call,
            message,
            delay,
            mode="retry",
            outcome=Outcome.RETRIED,
            detail=type(exc).__name__,
            ending=ending,
        )
        if reply[0] == "refused":
            metrics.BUDGET_REFUSALS.labels(d.name).inc()
            self.dead_letter(call, FailureClass.RETRY_BUDGET_EXHAUSTED, exc=exc, ran=False)
            return Outcome.DEAD_LETTERED, None
        metrics.OUTCOMES.labels(d.name, Outcome.RETRIED).inc()
        metrics.RETRIES.labels(d.name).inc()
        log.warning(
            "task_retry_scheduled",
            delay_seconds=round(delay, 3),
            error_type=type(exc).__name__,
            error=rt.masker.text(str(exc)),
        )
        return Outcome.RETRIED, delay

    def park(
        self,
        call: Call,
        message: ParkedMessage,
        delay: float,
        *,
        mode: str,
        outcome: Outcome,
        detail: str,
        ending: Ending | None = None,
    ) -> list[Any]:
        """Park the message (a retry, or a deferral that spends no attempt)."""
        d, rt = call.d, call.rt
        keys, cfg = rt.store.keys, rt.config
        reply: list[Any] = self.run(
            call,
            PARK,
            # Release only a lease this delivery holds (a deferral holds none).
            {
                "idem": idem_key(call) if d.idempotency_key and d.fence else "",
                "leases": keys.leases,
                "dlv": delivery_key(call),
                "ledger": keys.ledger,
                "budget": keys.budget(call.spec.tag),
                "parked": keys.parked,
                "parked_msgs": keys.parked_msgs,
                "defer": keys.defer(call.spec.tag, message.id),
            },
            {
                "owner": d.owner,
                "fence": str(d.fence) if d.fence else "",
                "mode": mode,
                "budget_window": cfg.budget_window_seconds,
                "budget_ratio": cfg.budget_ratio,
                "budget_floor": cfg.budget_min_retries_per_second,
                "park_id": message.id,
                "delay": delay,
                "envelope": message.to_json(),
                "dlv_ttl_ms": delivery_ttl_ms(call),
                "ledger_max": cfg.ledger_max_len,
                "task_id": d.task_id,
                "name": d.name,
                "attempt": d.attempt,
                "outcome": str(outcome),
                "detail": detail,
                "duration": ran_for(d.duration),
            },
            "park",
            self.tails(call, ending) if ending is not None else (),
        )
        if mode == "defer":
            # A deferral's reason is its verdict ("breaker_open", "in_progress", ...);
            # "degraded MINOR" counts as "degraded" (a bounded label).
            metrics.OUTCOMES.labels(d.name, outcome).inc()
            metrics.DEFERRALS.labels(d.name, detail.split(" ", 1)[0]).inc()
        return reply

    def dead_letter(
        self,
        call: Call,
        failure: FailureClass,
        *,
        exc: BaseException | None = None,
        reason: str = "",
        ran: bool,
    ) -> None:
        d, rt = call.d, call.rt
        keys, cfg = rt.store.keys, rt.config
        entry = for_call(call, failure, exc=exc, reason=reason)
        holds = bool(d.idempotency_key and d.fence)
        parts = self.tails(call, Ending("failure", exc, d.duration)) if ran else ()
        evicted = self.run(
            call,
            DEAD_LETTER,
            {
                "idem": idem_key(call) if holds else "",
                "leases": keys.leases,
                "dlv": delivery_key(call),
                "ledger": keys.ledger,
                "budget": keys.budget(call.spec.tag) if ran else "",
                "dlq": keys.dlq,
                "dlq_index": keys.dlq_index,
            },
            {
                "owner": d.owner if holds else "",
                "fence": str(d.fence),
                "budget_window": cfg.budget_window_seconds,
                "entry_id": entry.id,
                "envelope": entry.to_json(),
                "max_entries": cfg.dlq_max_entries,
                "dlv_ttl_ms": delivery_ttl_ms(call),
                "ledger_max": cfg.ledger_max_len,
                "task_id": d.task_id,
                "name": d.name,
                "attempt": d.attempt,
                "failure_class": str(failure),
                "duration": ran_for(d.duration),
            },
            "dead_letter",
            parts,
        )
        metrics.DEAD_LETTERS.labels(d.name, str(failure)).inc()
        metrics.OUTCOMES.labels(d.name, Outcome.DEAD_LETTERED).inc()
        log.error(
            "task_dead_lettered",
            failure_class=str(failure),
            dlq_id=entry.id,
            reason=entry.reason,
            error_type=entry.exception_type,
        )
        if evicted:
            metrics.DLQ_EVICTIONS.inc(int(evicted))
            log.warning("dlq_evicted_oldest", count=int(evicted), max_entries=cfg.dlq_max_entries)

    # -- releases -----------------------------------------------------------------------

    def release(self, call: Call) -> bool:
        """Release the delivery's lease (any fence of its owner when it has no fence yet)."""
        d = call.d
        if not d.idempotency_key:
            return False
        return bool(
            self.store(
                call,
                "release",
                lambda: call.rt.store.run(
                    RELEASE,
                    [idem_key(call), call.rt.store.keys.leases],
                    ["", d.owner, str(d.fence) if d.fence else ""],
                    "release",
                ),
            )
        )

    def release_guards(self, call: Call) -> None:
        """Free what the delivery holds in its guards (a breaker trial slot, concurrency
        places) without judging the call: it ended without an outcome (lost child,
        superseded, given up by the task)."""
        parts = self.tails(call, Ending("ignore", None, call.d.duration))
        if parts:
            self.run(call, SETTLE_ONLY, {}, {}, "release guards", parts)

    def record(self, call: Call, outcome: Outcome, detail: str) -> None:
        """A ledger record for an ending decided outside the settle scripts."""
        d = call.d
        self.store(
            call,
            "ledger",
            lambda: call.rt.ledger.record(d.task_id, d.name, outcome, d.attempt, detail),
        )
        metrics.OUTCOMES.labels(d.name, outcome).inc()


# The guards' settle tails alone (an ending with nothing else to record).
SETTLE_ONLY = Script((), (), (), body="--[fragments]\nreturn 1")
