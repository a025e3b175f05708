"""``ReliableTask``: a Celery task whose every delivery runs through the guard pipeline.

A task author declares guards in a few words on the decorator::

    @app.task(base=ReliableTask, name="payments.charge", idempotency_key_args=("payment_id",),
              retry_policy=RetryPolicy(max_attempts=5), args_model=ChargeArgs)
    def charge(payment_id: str, amount: int, currency: str) -> dict: ...

Each option belongs to one guard; an option no guard owns (a typo such as
``idempotency_tll``) fails at import time instead of silently switching a safeguard
off. The pipeline itself lives in :mod:`reliability.pipeline`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from celery import Task
from pydantic import BaseModel

from reliability.errors import ConfigurationError, PermanentError
from reliability.ratelimit import RateLimit
from reliability.retry import RetryPolicy
from reliability.sensitive import SensitiveArgs, set_delivery_values

# Options each guard owns, with what they mean (the README's options table).
GUARD_OPTIONS: dict[str, str] = {
    "idempotent": "idempotency: key every call (from the header, key args or all args)",
    "idempotency_key_args": "idempotency: argument names that form the key",
    "idempotency_ttl": "idempotency: seconds a completed key is remembered",
    "lease_ttl": "idempotency: seconds a lease lives without renewal",
    "retry_policy": "retry: the RetryPolicy (default: from settings)",
    "args_model": "validation: a pydantic model the arguments must satisfy",
    "dependency": "the downstream this task calls; its Redis hash tag",
    "breaker": "circuit breaker: the name of a breaker in settings (shared fleet-wide)",
    "breaker_fallback": "circuit breaker: a callable serving the call while it is open",
    "rate_limits": "rate limits: names in settings or RateLimit objects, all must admit",
    "sensitive_args": "secrets: argument names masked whole in events, logs, DLQ and results",
}

# Celery options that would bypass the pipeline's own retry and deferral.
REFUSED_CELERY_OPTIONS = {
    "autoretry_for": "use retry_policy: Celery's autoretry waits inside the worker",
    "rate_limit": "Celery's rate_limit is per worker; use the fleet-wide limiter",
}

_CELERY_DECORATOR_KEYS = {"run", "_decorated", "_decorated_fun", "__wrapped__", "__header__"}
# Execution options Celery reads from the task class without defining them on Task.
_CELERY_EXEC_OPTIONS = {"queue", "routing_key", "exchange", "delivery_mode", "compression",
                        "immediate", "mandatory", "pydantic", "pydantic_strict",
                        "pydantic_context", "pydantic_dump_kwargs"}


class ReliableTask(Task):  # type: ignore[misc]
    """Base class for tasks that run through the reliability pipeline."""

    Request = "reliability.request:ReliableRequest"
    # Expected failures: logged without a traceback by Celery.
    throws = (PermanentError,)
    acks_late = True
    reject_on_worker_lost = True

    idempotent: ClassVar[bool] = False
    idempotency_key_args: ClassVar[Sequence[str]] = ()
    idempotency_ttl: ClassVar[int | None] = None
    lease_ttl: ClassVar[float | None] = None
    retry_policy: ClassVar[RetryPolicy | None] = None
    args_model: ClassVar[type[BaseModel] | None] = None
    dependency: ClassVar[str | None] = None
    breaker: ClassVar[str | None] = None
    breaker_fallback: ClassVar[Any] = None
    rate_limits: ClassVar[Sequence[Any]] = ()
    sensitive_args: ClassVar[Sequence[str]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_decorated"):
            _check_options(cls)

    @property
    def tag(self) -> str:
        """The Redis hash tag shared by this task's admission keys."""
        return self.dependency or self.breaker or self.name

    @property
    def keyed(self) -> bool:
        return bool(self.idempotent or self.idempotency_key_args)

    @property
    def sensitive(self) -> SensitiveArgs:
        """Which arguments are masked whole (``sensitive_args`` resolved on the signature)."""
        found = self.__dict__.get("_reliable_sensitive")
        if found is None:
            found = SensitiveArgs.of(self.sensitive_args, inspect.signature(self.run))
            self.__dict__["_reliable_sensitive"] = found
        return found

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        from reliability.pipeline import pipeline_for

        # For this delivery, its sensitive values are masked by value in every log line,
        # exception, DLQ entry and result too (until the next delivery or task_postrun).
        set_delivery_values(self.sensitive.values(args, kwargs))
        return pipeline_for(self).execute(args, kwargs)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Write the completion if the result backend did not (no result stored)."""
        from reliability.settlement import flush_pending

        flush_pending(task_id)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        """The body succeeded but Celery failed after it (storing the result, dispatching
        callbacks): the completion is still written, before the ack."""
        from reliability.settlement import flush_pending

        flush_pending(task_id)

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None,
              throw: bool = True, eta: Any = None, countdown: float | None = None,
              max_retries: int | None = None, **options: Any) -> Any:
        """Ask for another attempt: parked in Redis by the pipeline, never a countdown."""
        from reliability.pipeline import RetryRequested

        raise RetryRequested(exc, countdown)


def _check_options(cls: type[ReliableTask]) -> None:
    name = cls.__dict__.get("name") or cls.__name__
    known = set(dir(Task)) | set(GUARD_OPTIONS) | _CELERY_DECORATOR_KEYS | _CELERY_EXEC_OPTIONS
    for option in cls.__dict__:
        if option.startswith("__") and option.endswith("__"):
            continue
        if option in REFUSED_CELERY_OPTIONS:
            raise ConfigurationError(f"task {name}: {option} — {REFUSED_CELERY_OPTIONS[option]}")
        if option not in known:
            close = difflib.get_close_matches(option, list(GUARD_OPTIONS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"task {name}: unknown option {option!r}{hint}")
    run = cls.__dict__.get("run")
    fn = getattr(run, "__func__", run)
    if fn is not None and cls.__dict__.get("idempotency_key_args"):
        params = set(inspect.signature(fn).parameters)
        missing = [a for a in cls.__dict__["idempotency_key_args"] if a not in params]
        if missing:
            raise ConfigurationError(
                f"task {name}: idempotency_key_args {missing} are not parameters of the task"
            )
    _check_sensitive_args(name, cls.__dict__.get("sensitive_args"), fn)
    policy = cls.__dict__.get("retry_policy")
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise ConfigurationError(f"task {name}: retry_policy must be a RetryPolicy")
    limits = cls.__dict__.get("rate_limits", ())
    if isinstance(limits, str | RateLimit) or not all(
            isinstance(x, str | RateLimit) for x in limits):
        raise ConfigurationError(
            f"task {name}: rate_limits must be a sequence of names or RateLimit objects")
    fallback = cls.__dict__.get("breaker_fallback")
    if fallback is not None and not callable(fallback):
        raise ConfigurationError(f"task {name}: breaker_fallback must be callable")
    if fallback is not None and not cls.__dict__.get("breaker"):
        raise ConfigurationError(f"task {name}: breaker_fallback needs a breaker")
    if inspect.isfunction(fallback):
        # A plain function on the class would bind to the task like a method.
        cls.breaker_fallback = staticmethod(fallback)  # type: ignore[assignment]
    model = cls.__dict__.get("args_model")
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigurationError(f"task {name}: args_model must be a pydantic model class")


def _check_sensitive_args(name: str, names: Any, fn: Any) -> None:
    """``sensitive_args`` is a sequence of parameter names of the task (a typo would
    silently leave a secret in clear)."""
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, Iterable) or not all(
            isinstance(n, str) for n in names):
        raise ConfigurationError(
            f"task {name}: sensitive_args must be a sequence of argument names, e.g. ('api_key',)")
    if fn is None:
        return
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # names may be keys of **kwargs
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigurationError(
            f"task {name}: sensitive_args {missing} are not parameters of the task")
