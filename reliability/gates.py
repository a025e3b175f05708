"""What a task declares that gates work the service starts for it: breaker, rate limits.

The DLQ reprocessor (:mod:`reliability.reprocess`) redrives a task's entries only while
the breaker the task declares is closed and its rate limits have headroom. It reads
them from the registered task's spec (``breaker=``, ``rate_limits=``), names resolved
against the runtime's limits, so it gates exactly what the task's admission gates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reliability.dlq import DeadLetter
from reliability.ratelimit.limit import RateLimit
from reliability.spec import TaskSpec


@dataclass(frozen=True)
class TaskGates:
    """What a task declares that gates its redrives: its breaker and its rate limits."""

    breaker: str | None = None
    limits: tuple[RateLimit, ...] = ()
    spec: TaskSpec | None = None  # binds an entry's arguments for scoped limits

    @classmethod
    def of(cls, spec: TaskSpec | None, rate_limits: Mapping[str, RateLimit]) -> TaskGates:
        """A registered task's gates (no spec: a task this process does not know)."""
        if spec is None:
            return cls()
        limits = tuple(
            x if isinstance(x, RateLimit) else rate_limits[x]
            for x in spec.option("rate_limits", ())
        )
        return cls(breaker=spec.option("breaker"), limits=limits, spec=spec)

    def scopes(self, entry: DeadLetter) -> tuple[tuple[RateLimit, str], ...]:
        """Each limit with the scope value ``entry``'s work is counted under."""

        def arguments() -> dict[str, Any]:
            try:
                return self.spec.bind(entry.args, entry.kwargs) if self.spec else {}
            except TypeError:
                return {}

        return tuple(
            (limit, limit.scope_value(entry.task_name, entry.tenant_id, arguments))
            for limit in self.limits
        )
