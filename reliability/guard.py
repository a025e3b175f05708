"""The ``Guard`` protocol: one class per guard, the pipeline a loop over a list of them.

A guard (redelivery cap, deferral id, idempotency, circuit breaker, rate limits) owns:

* the **task options** it reads (``options``: name -> meaning), checked when a task is
  declared (:meth:`Guard.check`; a misspelt option fails at import time, for every guard);
* its **admission fragment** (:meth:`Guard.part`), one piece of the single admission script,
  and the **verdicts** that fragment may return (a ``StrEnum`` the guard owns);
* what the pipeline does with each of its verdicts (:meth:`Guard.refused` returns an
  :data:`Action`: run, park until, skip, dead-letter, fall back, or ignore a duplicate);
* its **settle tail** (:meth:`Guard.settle`): a fragment of the settle script on every
  ending of a call that ran (or released without a judgement);
* what it **holds** while the body runs, for the lease keeper (:meth:`Guard.hold`).

Every hook has a no-op default, so a guard overrides only what it needs (after
Dramatiq's middleware). Order is the pipeline's ``GUARDS`` tuple and nothing else.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from reliability.errors import ConfigurationError
from reliability.scripts import Part

if TYPE_CHECKING:
    from reliability.admission import Verdict
    from reliability.delivery import Delivery
    from reliability.lease import Holding
    from reliability.runtime import Runtime
    from reliability.spec import TaskSpec


@dataclass
class Call:
    """One delivery of one task, as the guards see it: what the task declared, the
    runtime, and the delivery."""

    spec: TaskSpec
    rt: Runtime
    d: Delivery
    _arguments: dict[str, Any] | None = field(default=None, repr=False)

    def arguments(self) -> dict[str, Any]:
        """The arguments by parameter name (bound once per call)."""
        if self._arguments is None:
            self._arguments = self.spec.bind(self.d.args, self.d.kwargs)
        return self._arguments


@dataclass(frozen=True)
class Ending:
    """How a call that ran ended, for the settle tails: ``success`` (with the result),
    ``failure`` (with the error), or ``ignore`` (it ended without a judgement: lost child,
    superseded, given up)."""

    kind: str
    error: BaseException | None = None
    duration: float = 0.0
    result: Any = None


@dataclass(frozen=True)
class Skip:
    """Do not run: return this (the stored result of a completed key)."""

    result: Any


@dataclass(frozen=True)
class Duplicate:
    """Do not run and record nothing more: another copy of this delivery settled it."""


@dataclass(frozen=True)
class Park:
    """Do not run now: park the message for ``delay`` seconds (no attempt spent).
    ``reserved``: the copy keeps the rate-limit slots reserved for it."""

    delay: float
    detail: str
    reserved: bool = False


@dataclass(frozen=True)
class DeadLetter:
    """Never run: dead-letter the message with this failure class and reason."""

    failure_class: str
    reason: str
    error: type[Exception]


@dataclass(frozen=True)
class Fallback:
    """Serve the call with this callable instead of the body (the breaker's fallback),
    recorded as a ``fallback`` outcome with ``detail`` and logged as ``event``."""

    fn: Callable[..., Any]
    detail: str
    event: str = "task_fallback_served"
    fields: Mapping[str, Any] = field(default_factory=dict)


Action = Skip | Duplicate | Park | DeadLetter | Fallback
# A name a task declared that the settings do not define: (what, name, the known names).
Unresolved = tuple[str, str, list[str]]


class Guard:
    """Base class of the guards: every hook a no-op; override what the guard needs."""

    name: ClassVar[str] = "guard"
    options: ClassVar[Mapping[str, str]] = {}
    verdicts: ClassVar[type[StrEnum] | None] = None

    def check(self, task: str, values: Mapping[str, Any], signature: inspect.Signature) -> None:
        """Validate this guard's options as a task declared them (at import time)."""

    def tag(self, values: Mapping[str, Any]) -> str | None:
        """A Redis hash tag for the task's keys, if this guard's options give one."""
        return None

    def unresolved(self, options: Mapping[str, Any], rt: Runtime) -> list[Unresolved]:
        """Names the task declared for this guard that the runtime does not know
        (checked when the worker starts: a missing one stops it)."""
        return []

    def prepare(self, call: Call) -> None:
        """Before admission: derive what this guard needs from the delivery (e.g. its key)."""

    def part(self, call: Call) -> Part | None:
        """This delivery's piece of the admission script (None: the guard takes no part)."""
        return None

    def admitted(self, call: Call, verdict: Verdict) -> None:
        """The delivery may run: note what admission handed this guard (e.g. a trial)."""

    def refused(self, call: Call, verdict: Verdict) -> Action:
        """What to do with one of this guard's verdicts."""
        raise NotImplementedError(f"guard {self.name} returned {verdict.decision!r}")

    def settle(self, call: Call, ending: Ending) -> Part | None:
        """This guard's tail of the settle script on every ending (None: nothing)."""
        return None

    def hold(self, call: Call, holding: Holding) -> None:
        """Add what this delivery holds under this guard to ``holding`` (lease keeper)."""

    def owns(self, decision: str) -> bool:
        return self.verdicts is not None and decision in self.verdicts._value2member_map_


def require(condition: bool, task: str, message: str) -> None:
    """Raise the :class:`ConfigurationError` a task declaration gets for a bad option."""
    if not condition:
        raise ConfigurationError(f"task {task}: {message}")
