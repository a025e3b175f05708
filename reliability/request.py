"""``ReliableRequest``: the worker parent's side of a delivery.

Some endings are seen only by the parent process, never by the task code in the pool
child: the hard time limit (the child is killed), a lost child (SIGKILL, OOM), a
revoked or expired message. On each of them this request writes the outcome — DLQ
entry, parked retry, ledger record, released lease — *before* Celery acks or requeues
the message. It also shortens the soft time limit to the message's deadline, where
Celery reads the limits, so prefork enforces it.

A hard time limit kills the child *first*: billiard runs the request's failure and
timeout callbacks (result backend writes, DLQ envelope, events — work that grows with
the arguments) on the parent's event loop before it kills the child, so a slow callback
used to leave a stuck child running and the parent deaf to shutdown signals. At worker
shutdown, :mod:`worker.shutdown` kills children still running when the grace ends and
hands their messages back here (:meth:`ReliableRequest.abandon`).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterable
from typing import Any

import structlog
from billiard.exceptions import Terminated, WorkerLostError
from celery.exceptions import InvalidTaskError, Reject, TimeLimitExceeded
from celery.worker.request import Request
from celery.worker.state import task_ready

from reliability.consumer import hand_back
from reliability.deadline import parse_deadline, soft_limit
from reliability.delivery import (
    CORRELATION_ID,
    DEADLINE,
    REQUEST_CORRELATION_ID,
    REQUEST_OWNER,
    Delivery,
)
from reliability.dlq import FailureClass
from reliability.errors import BackendUnavailable, DeadlineExceeded
from reliability.guard import Call
from reliability.heartbeat import identity
from reliability.lease import Holding, Running
from reliability.ledger import Outcome
from reliability.pipeline import GUARDS, call_for
from reliability.poison import malformed
from reliability.reprs import current_masker, masked_reprs
from reliability.runtime import runtime_of
from reliability.settlement import Settlement

log = structlog.get_logger("reliability.request")
# The parent settles on its consumer thread: it waits this long for the store, then
# hands the message back unacked.
PARENT_STORE_WAIT_SECONDS = 2.0
PARENT = Settlement(GUARDS, wait=PARENT_STORE_WAIT_SECONDS)


class ReliableRequest(Request):  # type: ignore[misc]
    """Celery's request plus the parent-side endings of the pipeline."""

    _reliable_limits: tuple[Any, Any] = (None, None)
    # How this request's hard time limit ended: an Outcome, or "requeued" (store away).
    _hard_limit_ending: str | None = None
    # Worker shutdown killed (or is killing) this request's child: hand the message back.
    _abandoned = False

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        headers = kwargs.get("headers")
        source = message.headers if headers is None else headers
        correlation_id = (source or {}).get(CORRELATION_ID)
        super().__init__(message, *args, **kwargs)
        # Celery keeps the decoded body (args, kwargs, embed) as its `_payload`; the embed
        # (callbacks, errbacks, chain, chord) is merged into the pool child's request.
        problem = malformed(self._request_dict, self._args, self._kwargs, self._payload[2])
        if problem:
            # Celery's consumer dead-letters it as poison (ReliableConsumer.on_invalid_task).
            raise InvalidTaskError(f"malformed task message: {problem}")
        # Celery replaces `correlation_id` with the AMQP property and drops the delivery
        # tag; keep both for the pool child (log context, lease owner token).
        self._request_dict[REQUEST_CORRELATION_ID] = correlation_id
        # "<worker identity>:<nonce>": the maintenance leader frees a dead worker's leases
        # by this prefix (reliability.reaper).
        self._request_dict[REQUEST_OWNER] = f"{identity()}:{uuid.uuid4().hex}"
        self._delivery_info["delivery_tag"] = message.delivery_tag

    @property
    def time_limits(self) -> tuple[Any, Any]:
        """(hard, soft): the soft limit shortened to the deadline when one is set, and never
        above the hard limit — Celery's prefork pool arms the hard timer only once the soft
        one fired, so a soft limit above the hard one would delay the kill to the soft one.
        """
        hard, soft = self._reliable_limits
        value = self._request_dict.get(DEADLINE)
        deadline = parse_deadline(value) if isinstance(value, str) else None
        if deadline is not None and deadline.timestamp() > time.time():
            # Past deadlines are dead-lettered by the pipeline before the body runs; a
            # near-zero limit could fire while that DLQ entry is being written.
            base = soft or self._task.soft_time_limit or self._app.conf.task_soft_time_limit
            soft = soft_limit(base, deadline)
        limit = hard or self._task.time_limit or self._app.conf.task_time_limit
        effective_soft = soft or self._task.soft_time_limit or self._app.conf.task_soft_time_limit
        if limit and effective_soft and effective_soft > limit:
            soft = limit
        return hard, soft

    @time_limits.setter
    def time_limits(self, value: tuple[Any, Any]) -> None:
        self._reliable_limits = tuple(value)  # type: ignore[assignment]

    # -- parent-side endings ---------------------------------------------------------------

    def _call(self) -> Call:
        """This delivery as the guards see it (keyed as the pool child keys it)."""
        d = Delivery.from_request(self._request_dict, self._task.name, self.args, self.kwargs)
        return call_for(self._task.spec, runtime_of(self._task.app), d)

    def holding(self) -> Holding | None:
        """What this delivery holds while it runs (built on the lease keeper's thread)."""
        call = self._call()
        holding = Holding(owner=call.d.owner, pid=None)
        for guard in GUARDS:
            guard.hold(call, holding)
        return holding

    def _settle(self, settle: Any, *args: Any) -> bool:
        """Run a parent-side settlement (a short store wait: PARENT); False if the store
        is away (the caller then hands the message back unacked instead of acking it)."""
        try:
            settle(*args)
        except (BackendUnavailable, Reject) as exc:
            log.error("task_ending_unrecorded_requeued", task_id=self.id, error=str(exc))
            return False
        return True

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """billiard's timeout callback. A hard limit was settled in :meth:`on_failure`,
        which billiard calls first; only a dead-lettered one goes on to Celery's failure
        handling here."""
        if not soft and self._hard_limit_ending not in (None, Outcome.DEAD_LETTERED):
            return
        super().on_timeout(soft, timeout)

    def _hard_time_limit(self, timeout: float) -> bool:
        """The hard limit hit: kill the child now, then settle the ending (retry or DLQ)
        before anything is acked. True when Celery's failure handling should go on (a
        dead-lettered ending); else the message is acked (a parked retry, which the result
        backend does not hear of, as with a retry in the child) or handed back unacked
        (the store is away)."""
        self._kill_child()
        if not self._task.acks_late:
            return True
        if not self._settle(self._settle_hard_timeout, timeout):
            self._hard_limit_ending = "requeued"
            task_ready(self)
            self.reject(requeue=True)
            return False
        if self._hard_limit_ending == Outcome.RETRIED:
            task_ready(self)
            self.acknowledge()
            return False
        return True

    def _kill_child(self) -> None:
        """SIGKILL the pool child running this request (its process group if it leads
        one, as billiard does). A stuck child may block every other signal."""
        pid = self.worker_pid
        if not pid:
            return
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            return  # already gone
        log.warning("task_hard_time_limit_child_killed", task_id=self.id, pid=pid)

    def _settle_hard_timeout(self, timeout: float) -> None:
        call = self._call()
        PARENT.release(call)
        outcome, delay = PARENT.failure(
            call, TimeLimitExceeded(f"hard time limit ({timeout}s) exceeded"), ran=True)
        self._hard_limit_ending = outcome
        log.warning("task_hard_time_limit", task_id=self.id, task_name=self.name,
                    settled_as=str(outcome), retry_in=delay)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if self._abandoned and isinstance(exc, Terminated | WorkerLostError):
            self._hand_back()
            return
        if isinstance(exc, TimeLimitExceeded) and not return_ok:
            # billiard's hard time limit (a body's own TimeLimitExceeded has return_ok).
            if not self._hard_time_limit(exc.args[0] if exc.args else 0):
                return
        elif isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt):
            self._child_lost(exc)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _child_lost(self, exc: BaseException) -> None:
        """Release the dead child's lease now, so the redelivered copy need not wait."""
        if self._already_revoked or self._already_cancelled:
            return
        self._record_requeued(type(exc).__name__, str(exc))

    def abandon(self) -> None:
        """Worker shutdown is about to kill this request's child (:mod:`worker.shutdown`).

        When the pool then reports the job terminated, the message is handed back to the
        broker unacked (lease freed, ledger ``requeued``) instead of being read as a
        revoke. That happens on the event loop, after any result the child sent before it
        died: a task that finished just before the kill is acked as usual.
        """
        self._abandoned = True
        self._already_cancelled = True  # Celery: a child killed on purpose, not a revoke

    def _hand_back(self) -> None:
        if self.acknowledged:
            return
        try:
            # Killed after storing its result but before telling the parent (a kill can
            # land there): done, so acked, as Celery does for a child lost there.
            succeeded = bool(self._success_was_stored())
        except Exception:
            succeeded = False
        if succeeded:
            log.info("task_succeeded_before_shutdown_kill", task_id=self.id)
            task_ready(self, successful=True)
            self.acknowledge()
            return
        self._record_requeued("WorkerShutdown", "killed at worker shutdown",
                              event="task_handed_back_at_shutdown")
        task_ready(self)
        self.reject(requeue=True)

    def _record_requeued(self, reason: str, detail: str,
                         event: str = "task_child_lost_requeued") -> None:
        try:
            call = self._call()
            released = PARENT.release(call)
            PARENT.release_guards(call)
            PARENT.record(call, Outcome.REQUEUED, reason)
        except (BackendUnavailable, Reject) as error:
            # The lease lapses by itself within its TTL; the message is requeued anyway.
            log.error("lease_release_failed_child_lost", task_id=self.id, error=str(error))
            return
        log.warning(event, task_id=self.id, task_name=self.name, lease_released=released,
                    error=detail)

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """Celery cancels running late-ack tasks when the broker connection is lost.

        Such a task was not revoked: its message stays unacked and runs again (restored
        by the reaper once its lease lapses, or by kombu's visibility sweep). Celery only
        marks the request cancelled after writing RETRY to the result backend, which
        fails when that backend is the Redis that just went away; the child's death is
        then misread as a revoke and the message acked. Mark it cancelled first.
        """
        self._already_cancelled = True
        if not self.acknowledged:
            hand_back(self._delivery_info.get("delivery_tag"))
        try:
            super().cancel(pool, signal, emit_retry)
        except Exception as exc:
            log.warning("task_cancel_unannounced", task_id=self.id, error=str(exc))

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any,
                          expired: bool) -> None:
        if not self._settle(self._settle_revoked, reason, terminated, expired):
            task_ready(self)
            self._already_revoked = True
            self.reject(requeue=True)
            return
        super()._announce_revoked(reason, terminated, signum, expired)

    def _settle_revoked(self, reason: str, terminated: bool, expired: bool) -> None:
        call = self._call()
        if terminated:
            PARENT.release(call)
        if expired:
            PARENT.dead_letter(
                call, FailureClass.EXPIRED,
                exc=DeadlineExceeded(f"message expired before it ran ({reason})"), ran=False)
            return
        PARENT.record(call, Outcome.REVOKED, reason)
        log.warning("task_revoked", task_id=self.id, task_name=self.name, reason=reason,
                    terminated=terminated)

    # -- what Celery shows of the arguments ---------------------------------------------
    # Celery reads `_argsrepr`/`_kwargsrepr` for the task-received event (Flower), the
    # "Received task" log line, inspect replies and repr(). The producer's reprs may hold
    # secrets: they are never shown; these properties give the masked reprs, computed
    # from the arguments once, on first use.

    @property
    def _argsrepr(self) -> str:
        return self._masked_reprs()[0]

    @_argsrepr.setter
    def _argsrepr(self, _producer_repr: str) -> None:
        pass

    @property
    def _kwargsrepr(self) -> str:
        return self._masked_reprs()[1]

    @_kwargsrepr.setter
    def _kwargsrepr(self, _producer_repr: str) -> None:
        pass

    def _masked_reprs(self) -> tuple[str, str]:
        found: tuple[str, str] | None = self.__dict__.get("_reliable_reprs")
        if found is None:
            found = masked_reprs(self._task, self._args, self._kwargs)
            self.__dict__["_reliable_reprs"] = found
            # The pool child logs the reprs of its request dict ("Task ... succeeded").
            self._request_dict["argsrepr"], self._request_dict["kwargsrepr"] = found
        return found

    def execute_using_pool(self, pool: Any, **kwargs: Any) -> Any:
        self._masked_reprs()  # before the request dict goes to the pool child
        return super().execute_using_pool(pool, **kwargs)

    def send_event(self, type: str, **fields: Any) -> None:
        """Task events (succeeded, failed, retried, ...) carry the result's repr, the
        exception and its traceback as text: masked like a log line, this delivery's
        sensitive argument values included."""
        if fields and self._eventer and self._eventer.enabled:
            masker = current_masker().including(
                self._task.sensitive.values(self._args, self._kwargs)
                if hasattr(self._task, "sensitive") else ())
            fields = {k: masker.text(v) if isinstance(v, str) else v
                      for k, v in fields.items()}
        super().send_event(type, **fields)


def running_deliveries() -> Iterable[Running]:
    """The reliable deliveries running in this worker now, for the lease keeper."""
    from celery.worker.state import active_requests

    wall, mono = time.time(), time.monotonic()
    for request in tuple(active_requests):
        if isinstance(request, ReliableRequest) and not request.acknowledged:
            owner = request._request_dict.get(REQUEST_OWNER) or request.id
            started = request.time_start
            yield Running(str(owner), request.worker_pid,
                          None if not started else mono - (wall - started), request.holding)
