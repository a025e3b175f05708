"""Degradation levels and the rules that compute one from health and breaker states.

Pure logic (no Redis, the clock passed in), so rules are unit-tested with fixed times.
A rule names one condition and the level it implies: a health component (a name or a
glob such as ``provider:*``) at a status or worse, a named breaker open, or at least N
breakers open. The highest level any rule matches wins; none matching is NORMAL.
Health results older than ``max_age`` seconds are ignored (a stopped poller does not
keep the fleet degraded, nor healthy by accident: the reason says so).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from reliability.errors import ConfigurationError


class Level(StrEnum):
    """The fleet's degradation levels, mildest first (seed 003)."""

    NORMAL = "NORMAL"
    MINOR = "MINOR"
    MODERATE = "MODERATE"
    SEVERE = "SEVERE"
    CRITICAL = "CRITICAL"

    @property
    def rank(self) -> int:
        return list(Level).index(self)


# A component's status and every worse one.
STATUSES = ("healthy", "degraded", "unhealthy")


@dataclass(frozen=True)
class Rule:
    """``level`` when the one condition given holds: ``component`` (glob) at ``status``
    or worse, ``breaker`` (glob) open, or at least ``breakers_open`` breakers open."""

    level: Level
    component: str | None = None
    status: str = "unhealthy"
    breaker: str | None = None
    breakers_open: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "level", Level(self.level))
        except ValueError:
            raise ConfigurationError(
                f"degradation rule: unknown level {self.level!r}; one of {[x.value for x in Level]}"
            ) from None
        given = [x for x in (self.component, self.breaker, self.breakers_open) if x is not None]
        if len(given) != 1:
            raise ConfigurationError(
                f"degradation rule {self}: give exactly one of component, breaker, breakers_open"
            )
        if self.level is Level.NORMAL:
            raise ConfigurationError("degradation rule: NORMAL is what no rule matching means")
        if self.status not in STATUSES[1:]:
            raise ConfigurationError(
                f"degradation rule: status must be 'degraded' or 'unhealthy', not {self.status!r}"
            )
        if self.breakers_open is not None and self.breakers_open < 1:
            raise ConfigurationError("degradation rule: breakers_open must be at least 1")

    def matches(self, health: Mapping[str, str], open_breakers: Iterable[str]) -> str | None:
        """Why this rule holds (for the reason), or None."""
        if self.component is not None:
            worst = STATUSES.index(self.status)
            hit = sorted(
                f"{name} {status}"
                for name, status in health.items()
                if fnmatch.fnmatchcase(name, self.component)
                and status in STATUSES
                and STATUSES.index(status) >= worst
            )
            return ", ".join(hit) or None
        opened = sorted(open_breakers)
        if self.breaker is not None:
            hit = [n for n in opened if fnmatch.fnmatchcase(n, self.breaker)]
            return ", ".join(f"breaker {n} open" for n in hit) or None
        assert self.breakers_open is not None
        if len(opened) >= self.breakers_open:
            return f"{len(opened)} breaker(s) open: {', '.join(opened)}"
        return None


# Sensible defaults (README "Degradation levels"); RELIABLE_DEGRADATION__RULES replaces them.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(Level.MINOR, component="provider:*", status="degraded"),
    Rule(Level.MODERATE, component="provider:*", status="unhealthy"),
    Rule(Level.MINOR, breakers_open=1),
    Rule(Level.MODERATE, breakers_open=2),
    Rule(Level.SEVERE, breakers_open=3),
    Rule(Level.MODERATE, component="redis", status="degraded"),
    Rule(Level.MODERATE, component="broker", status="degraded"),
    Rule(Level.SEVERE, component="workers", status="unhealthy"),
    Rule(Level.CRITICAL, component="redis", status="unhealthy"),
    Rule(Level.CRITICAL, component="broker", status="unhealthy"),
)


@dataclass(frozen=True)
class Computed:
    """The rules' level and why (every rule that matched at that level)."""

    level: Level
    reason: str


def health_statuses(
    raw: Mapping[str, str], now: float, max_age: float
) -> tuple[dict[str, str], list[str]]:
    """Component -> status from the health hash (JSON values, the H3 contract), and the
    components ignored (unreadable, or checked more than ``max_age`` seconds ago)."""
    statuses: dict[str, str] = {}
    ignored: list[str] = []
    for name, text in raw.items():
        try:
            result: Any = json.loads(text)
            status, checked = str(result["status"]), float(result.get("checked_at") or 0)
        except (ValueError, TypeError, KeyError, AttributeError):
            ignored.append(f"{name} unreadable")
            continue
        if now - checked > max_age:
            ignored.append(f"{name} stale")
            continue
        statuses[name] = status
    return statuses, sorted(ignored)


def breaker_is_open(snapshot: Mapping[str, Any]) -> bool:
    """Open for the rules: open and enforcing, or forced open (shadow and disabled
    breakers reject nothing, so they degrade nothing)."""
    mode = snapshot.get("mode", "normal")
    return mode == "forced_open" or (snapshot.get("state") == "open" and mode == "normal")


def compute(
    rules: Iterable[Rule],
    health: Mapping[str, str],
    breakers: Mapping[str, Mapping[str, Any]],
    *,
    now: float,
    max_age: float,
) -> Computed:
    """The level the rules give for this health hash (raw JSON values) and these breaker
    snapshots (name -> ``{"state", "mode"}``) at time ``now``."""
    statuses, ignored = health_statuses(health, now, max_age)
    opened = [name for name, snap in breakers.items() if breaker_is_open(snap)]
    level, reasons = Level.NORMAL, list[str]()
    for rule in rules:
        why = rule.matches(statuses, opened)
        if why is None or rule.level.rank < level.rank:
            continue
        if rule.level.rank > level.rank:
            level, reasons = rule.level, []
        reasons.append(why)
    reason = "; ".join(dict.fromkeys(reasons)) or "no rule matched"
    if ignored:
        reason += f" (ignored: {', '.join(ignored)})"
    return Computed(level, reason)
