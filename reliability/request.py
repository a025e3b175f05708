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
from typing import Any

import structlog
from billiard.exceptions import Terminated, WorkerLostError
from celery.exceptions import InvalidTaskError, TimeLimitExceeded
from celery.worker.request import Request
from celery.worker.state import task_ready

from reliability import endings
from reliability.consumer import hand_back
from reliability.deadline import parse_deadline, soft_limit
from reliability.delivery import CORRELATION_ID, DEADLINE, REQUEST_CORRELATION_ID, REQUEST_OWNER
from reliability.heartbeat import identity
from reliability.ledger import Outcome
from reliability.poison import malformed
from reliability.reprs import current_masker, masked_reprs

log = structlog.get_logger("reliability.request")


class ReliableRequest(Request):
    """Celery's request plus the parent-side endings of the pipeline."""

    # Celery's private request state, which the stubs leave out (set in Request.__init__).
    _request_dict: dict[str, Any]
    _args: Any
    _kwargs: Any
    _delivery_info: dict[str, Any]
    _task: Any
    _app: Any
    _eventer: Any
    _payload: Any
    _already_revoked: bool
    _already_cancelled: bool

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
        hard, soft = value
        self._reliable_limits = (hard, soft)

    # -- parent-side endings ---------------------------------------------------------------

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
        if not endings.settle(self, self._settle_hard_timeout, timeout):
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
        if not self.worker_pid:
            return
        pid = int(self.worker_pid)  # the stubs say str; billiard gives an int
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            return  # already gone
        log.warning("task_hard_time_limit_child_killed", task_id=self.id, pid=pid)

    @staticmethod
    def _settle_hard_timeout(request: ReliableRequest, timeout: float) -> None:
        request._hard_limit_ending = endings.hard_time_limit(request, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
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
        endings.requeued(self, type(exc).__name__, str(exc))

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
            succeeded = bool(self._success_was_stored())  # type: ignore[attr-defined]
        except Exception:
            succeeded = False
        if succeeded:
            log.info("task_succeeded_before_shutdown_kill", task_id=self.id)
            task_ready(self, successful=True)
            self.acknowledge()
            return
        endings.requeued(
            self,
            "WorkerShutdown",
            "killed at worker shutdown",
            event="task_handed_back_at_shutdown",
        )
        task_ready(self)
        self.reject(requeue=True)

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

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any, expired: bool) -> None:
        if not endings.settle(self, endings.revoked, reason, terminated, expired):
            task_ready(self)
            self._already_revoked = True
            self.reject(requeue=True)
            return
        super()._announce_revoked(  # type: ignore[misc]
            reason, terminated, signum, expired
        )

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
                if hasattr(self._task, "sensitive")
                else ()
            )
            fields = {k: masker.text(v) if isinstance(v, str) else v for k, v in fields.items()}
        super().send_event(type, **fields)
