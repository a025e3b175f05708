"""What one task declared, read once when it is declared: the options each guard owns.

A task author declares guards in a few words on the decorator (``breaker="payment"``,
``idempotency_key_args=("payment_id",)``, ...). :func:`build` checks every option
against the guards that own them — an option nobody owns (``idempotency_tll``) fails at
import time with a "did you mean" hint, instead of silently switching a safeguard off —
and keeps them in a :class:`TaskSpec` the pipeline and the worker's parent read. The
pipeline's own options (retry, validation, hash tag, secrets) are listed here; every
other option belongs to a guard (``Guard.options``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from reliability.errors import ConfigurationError
from reliability.guard import Guard, require
from reliability.idempotency import bind_arguments
from reliability.retry import RetryPolicy
from reliability.sensitive import NO_SENSITIVE_ARGS, SensitiveArgs

# Options of the pipeline itself (not of a guard), with what they mean.
PIPELINE_OPTIONS: dict[str, str] = {
    "retry_policy": "retry: the RetryPolicy (default: from settings)",
    "args_model": "validation: a pydantic model the arguments must satisfy",
    "dependency": "the downstream this task calls; its Redis hash tag",
    "sensitive_args": "secrets: argument names masked whole in events, logs, DLQ and results",
}

# Celery options that would bypass the pipeline's own retry and deferral.
REFUSED_CELERY_OPTIONS = {
    "autoretry_for": "use retry_policy: Celery's autoretry waits inside the worker",
    "rate_limit": "Celery's rate_limit is per worker; use the fleet-wide limiter",
}


@dataclass
class TaskSpec:
    """One task's declaration: its name, signature and options (declared or default)."""

    name: str
    signature: inspect.Signature
    options: Mapping[str, Any]
    tag: str  # the Redis hash tag its keys share: dependency, else a guard's, else the name
    sensitive: SensitiveArgs = NO_SENSITIVE_ARGS  # arguments masked whole
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments by parameter name, so positional and keyword calls key alike."""
        return bind_arguments(self.signature, args, kwargs)

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """A value derived from the spec once (per runtime, if ``key`` says so)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def options_of(guards: Iterable[Guard]) -> dict[str, str]:
    """Every option a reliable task may declare, with its meaning."""
    found = dict(PIPELINE_OPTIONS)
    for guard in guards:
        found.update(guard.options)
    return found


def build(
    name: str,
    declared: Mapping[str, Any],
    signature: inspect.Signature,
    guards: Sequence[Guard],
    *,
    ignore: Iterable[str] = (),
) -> TaskSpec:
    """Check a task's declaration against the guards and return its spec.

    ``declared``: the attributes the task class defines; ``ignore``: names that are not
    options (Celery's own attributes).
    """
    known = options_of(guards)
    skip = set(ignore)
    for option in declared:
        if option in REFUSED_CELERY_OPTIONS:
            raise ConfigurationError(f"task {name}: {option} — {REFUSED_CELERY_OPTIONS[option]}")
        if option in skip or (option.startswith("__") and option.endswith("__")):
            continue
        if option not in known:
            close = difflib.get_close_matches(option, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"task {name}: unknown option {option!r}{hint}")
    values = {option: declared.get(option) for option in known}
    _check_pipeline_options(name, values, signature)
    tag = values.get("dependency")
    for guard in guards:
        guard.check(name, values, signature)
        tag = tag or guard.tag(values)
    sensitive = SensitiveArgs.of(values.get("sensitive_args") or (), signature)
    return TaskSpec(
        name=name, signature=signature, options=values, tag=str(tag or name), sensitive=sensitive
    )


def _check_pipeline_options(
    name: str, values: Mapping[str, Any], signature: inspect.Signature
) -> None:
    policy = values.get("retry_policy")
    require(
        policy is None or isinstance(policy, RetryPolicy),
        name,
        "retry_policy must be a RetryPolicy",
    )
    model = values.get("args_model")
    require(
        model is None or (isinstance(model, type) and issubclass(model, BaseModel)),
        name,
        "args_model must be a pydantic model class",
    )
    names = values.get("sensitive_args")
    if names is None:
        return
    require(
        not isinstance(names, str)
        and isinstance(names, Iterable)
        and all(isinstance(n, str) for n in names),
        name,
        "sensitive_args must be a sequence of argument names, e.g. ('api_key',)",
    )
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # names may be keys of **kwargs
    missing = [n for n in names if n not in params]
    require(not missing, name, f"sensitive_args {missing} are not parameters of the task")
