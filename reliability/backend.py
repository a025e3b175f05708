"""A Celery Redis result backend that writes the task's completion record with its result.

Why: a successful delivery must record its completion (idempotency result, delivery
record, ledger) before the ack, and Celery then stores the result — reading the stored
state first so it never overwrites a SUCCESS. That is three round trips. When the result
backend is the state store's Redis, this backend does all of it in one Lua script:
completion, the SUCCESS check, the result write and its PUBLISH. Nothing is weakened:
it still happens in the pool child before Celery acks, and if the store is unreachable
the message is handed back unacked (``Reject``), as on the unfused path.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.redis import RedisBackend

from reliability import completion as completions
from reliability.reprs import sensitive_of
from reliability.runtime import Runtime, runtime_of


class ReliableRedisBackend(RedisBackend):
    """Celery's Redis backend; fuses pending completions into the result write."""

    # Set in the backend's __init__; the stubs leave them out.
    app: Any
    expires: Any

    fuses_completion = True

    @property
    def runtime(self) -> Runtime:
        return runtime_of(self.app)

    def _get_result_meta(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's meta, secrets masked: in the result and traceback by value and
        pattern; the task's arguments (``result_extended``) as in a DLQ entry — sensitive
        arguments whole, values under sensitive keys too."""
        meta = super()._get_result_meta(*args, **kwargs)  # type: ignore[misc]
        masker = self.runtime.masker
        call = {k: meta.pop(k) for k in ("args", "kwargs") if k in meta}
        meta = masker.values(meta)
        raw_args, raw_kwargs = call.get("args"), call.get("kwargs")
        if isinstance(raw_args, list | tuple) and isinstance(raw_kwargs, dict):
            task = self.app.tasks.get(meta.get("name") or "")
            call["args"], call["kwargs"] = masker.call(raw_args, raw_kwargs, sensitive_of(task))
        else:  # absent, or already encoded by Celery: masked as text
            call = masker.data(call)
        meta.update(call)
        return meta

    def _store_result(
        self,
        task_id: Any,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        # The pipeline left the completion on the task's request context (completion.py).
        completion = completions.take(request) if state == states.SUCCESS else None
        if completion is None:
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback=traceback, request=request, **kwargs
            )
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = str(task_id)
        try:
            value = self.encode(meta)
        except Exception:
            completion.write(self.runtime)  # the body succeeded: record it regardless
            raise
        completion.write(
            self.runtime,
            completions.COMPLETE_AND_STORE,
            keys={"meta": self.get_key_for_task(task_id)},
            args={"meta_value": value, "meta_expires": int(self.expires or 0)},
        )
        return result
