"""A fleet-wide rate limit: its kind and parameters, what it is keyed by, its keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from reliability.errors import ConfigurationError
from reliability.security import hashed_token, key_token
from reliability.store import Store

log = structlog.get_logger("reliability.ratelimit")
Kind = Literal["gcra", "sliding", "fixed", "concurrency"]
# What a limit is keyed by: the task, a header, an argument, or nothing (global).
Scope = str  # "global" | "task" | "tenant" | "user" | "ip" | "arg:<name>"

SCOPE_ARGS = {"user": "user_id", "ip": "ip"}
# RateLimit's whole-number fields (the others are seconds or rates).
COUNT_FIELDS = frozenset({"burst", "max_requests", "limit", "cost"})


@dataclass(frozen=True)
class RateLimit:
    """One limit's policy. ``p1``/``p2`` are what the Lua reads for its kind."""

    name: str
    kind: Kind = "gcra"
    rate: float = 10.0  # gcra: tokens per second
    burst: int = 1  # gcra: bucket capacity
    max_requests: int = 100  # sliding / fixed
    window_seconds: float = 60.0  # sliding / fixed
    limit: int = 10  # concurrency
    lease_seconds: float = 300.0  # concurrency: a dead holder frees its slot after this
    per: Scope = "global"
    cost: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("gcra", "sliding", "fixed", "concurrency"):
            raise ConfigurationError(f"rate limit {self.name}: unknown kind {self.kind!r}")
        if self.rate <= 0 or self.burst < 1 or self.max_requests < 1 or self.limit < 1:
            raise ConfigurationError(f"rate limit {self.name}: rates and sizes must be positive")
        if self.window_seconds <= 0 or self.lease_seconds <= 0 or self.cost < 1:
            raise ConfigurationError(f"rate limit {self.name}: windows and cost must be positive")
        most = {"gcra": self.burst, "concurrency": self.limit}.get(self.kind, self.max_requests)
        if self.cost > most:
            raise ConfigurationError(
                f"rate limit {self.name}: cost {self.cost} exceeds what the limit ever admits"
                f" at once ({most}); such a call could never conform"
            )
        if self.per not in ("global", "task", "tenant", "user", "ip") and not self.per.startswith(
            "arg:"
        ):
            raise ConfigurationError(f"rate limit {self.name}: unknown scope {self.per!r}")

    @property
    def params(self) -> tuple[float, float]:
        if self.kind == "gcra":
            return self.rate, self.burst
        if self.kind == "concurrency":
            return self.limit, self.lease_seconds
        return self.max_requests, self.window_seconds

    def scope_key(self, value: str) -> str:
        """A scope value as it appears in the limit's Redis key name.

        Values taken from arguments (``user``, ``ip``, ``arg:<name>``) are always hashed;
        a tenant id stays readable when short and of a safe charset (else hashed); the
        global and task scopes are not input. ``reliable limits reset --scope <value>``
        takes the value itself and goes through here too.
        """
        if self.per in ("global", "task"):
            return value
        if self.per == "tenant":
            token = key_token(value)
            # "cfg" names the limit's runtime overrides (limit_keys): a tenant of that
            # name is hashed instead of sharing the key.
            return hashed_token(value) if token == "cfg" else token
        return hashed_token(value)

    def scope_value(
        self, task_name: str, tenant: str | None, arguments: Callable[[], dict[str, Any]]
    ) -> str:
        """The value this limit is keyed by for one call."""
        if self.per == "global":
            return "-"
        if self.per == "task":
            return task_name
        if self.per == "tenant":
            return tenant or "-"
        arg = self.per[4:] if self.per.startswith("arg:") else SCOPE_ARGS[self.per]
        return str(arguments().get(arg, "-"))


# Limits the business tasks use, after seed 000's guidance; settings replace them by name.
DEFAULT_LIMITS: dict[str, RateLimit] = {
    "payment-gateway": RateLimit(name="payment-gateway", kind="gcra", rate=10, burst=15),
    "notification-per-user": RateLimit(
        name="notification-per-user", kind="sliding", max_requests=5, window_seconds=60, per="user"
    ),
    "analytics-export": RateLimit(name="analytics-export", kind="gcra", rate=2, burst=10),
}


def limit_keys(store: Store, limit: RateLimit, scope: str) -> list[str]:
    """A limit's keys: one per scope value (never embedded verbatim when it comes from
    input: :meth:`RateLimit.scope_key`) plus its runtime overrides, shared by every task
    naming the limit. Hash-tagged by the limit's name: give a limit the name of the
    dependency it protects (as breakers are) and one admission's keys share a slot."""
    base = f"{store.keys.prefix}:{{{limit.name}}}:rl"
    return [f"{base}:{limit.scope_key(scope)}", f"{base}:cfg"]
