"""``ReliableTask``: a Celery task whose every delivery runs through the guard pipeline.

A task author declares guards in a few words on the decorator::

    @app.task(base=ReliableTask, name="payments.charge", idempotency_key_args=("payment_id",),
              retry_policy=RetryPolicy(max_attempts=5), args_model=ChargeArgs)
    def charge(payment_id: str, amount: int, currency: str) -> dict: ...

The options are checked when the task is declared against the guards that own them
(:mod:`reliability.spec`, :mod:`reliability.guard`) and kept in the class's ``spec``; the
pipeline (:mod:`reliability.pipeline`) runs each delivery with the runtime its app
carries.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from celery import Task

from reliability import completion
from reliability.errors import PermanentError
from reliability.idempotency import keyed
from reliability.pipeline import GUARDS, Pipeline, RetryRequested
from reliability.runtime import Runtime, runtime_of
from reliability.sensitive import SensitiveArgs, set_delivery_values
from reliability.spec import TaskSpec, build

_CELERY_DECORATOR_KEYS = {"run", "_decorated", "_decorated_fun", "__wrapped__", "__header__"}
# Execution options Celery reads from the task class without defining them on Task.
_CELERY_EXEC_OPTIONS = {
    "queue",
    "routing_key",
    "exchange",
    "delivery_mode",
    "compression",
    "immediate",
    "mandatory",
    "pydantic",
    "pydantic_strict",
    "pydantic_context",
    "pydantic_dump_kwargs",
    "spec",
}


def _signature(run: Any) -> inspect.Signature:
    """The signature callers use: a bound task's ``self`` is not an argument."""
    if isinstance(run, staticmethod):
        return inspect.signature(run.__func__)
    signature = inspect.signature(run)
    parameters = list(signature.parameters.values())[1:]
    return signature.replace(parameters=parameters)


class ReliableTask(Task[Any, Any]):
    """Base class for tasks that run through the reliability pipeline."""

    Request = "reliability.request:ReliableRequest"
    # Expected failures: logged without a traceback by Celery.
    throws = (PermanentError,)
    acks_late = True
    reject_on_worker_lost = True
    spec: ClassVar[TaskSpec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_decorated"):
            name = str(cls.__dict__.get("name") or cls.__name__)
            ignore = set(dir(Task)) | _CELERY_DECORATOR_KEYS | _CELERY_EXEC_OPTIONS
            cls.spec = build(
                name, cls.__dict__, _signature(cls.__dict__["run"]), GUARDS, ignore=ignore
            )

    @property
    def tag(self) -> str:
        """The Redis hash tag shared by this task's admission keys."""
        return self.spec.tag

    @property
    def keyed(self) -> bool:
        return keyed(self.spec.options)

    @property
    def sensitive(self) -> SensitiveArgs:
        """Which arguments are masked whole (``sensitive_args`` resolved on the signature)."""
        return self.spec.sensitive

    def pipeline(self, runtime: Runtime) -> Pipeline:
        """This task's pipeline for ``runtime`` (built once per process and runtime)."""
        found = self.__dict__.get("_reliable_pipeline")
        if found is None or found.rt is not runtime:
            found = self.__dict__["_reliable_pipeline"] = Pipeline(self.spec, runtime)
        return found

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        # For this delivery, its sensitive values are masked by value in every log line,
        # exception, DLQ entry and result too (until the next delivery or task_postrun).
        set_delivery_values(self.spec.sensitive.values(args, kwargs))
        return self.pipeline(runtime_of(self.app)).execute(self, args, kwargs)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Write the completion if the result backend did not (no result stored)."""
        self._flush_completion()

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """The body succeeded but Celery failed after it (storing the result, dispatching
        callbacks): the completion is still written, before the ack."""
        self._flush_completion()

    def _flush_completion(self) -> None:
        pending = completion.take(self.request)
        if pending is not None:
            pending.write(runtime_of(self.app))

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Ask for another attempt: parked in Redis by the pipeline, never a countdown."""
        raise RetryRequested(exc, countdown)
