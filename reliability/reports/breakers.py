"""Breaker open time and flaps in a period, from the fleet's transitions stream."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from reliability.reports.sources import Transition


@dataclass
class BreakerStats:
    """One breaker over a period. ``flaps``: the times it tripped (closed -> open, as the
    breaker monitor counts them) in the period; ``open_seconds``: the time it spent open."""

    breaker: str
    state_at_start: str = "closed"
    state_at_end: str = "closed"
    open_seconds: float = 0.0
    half_open_seconds: float = 0.0
    flaps: int = 0
    transitions: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["open_seconds"] = round(self.open_seconds, 3)
        data["half_open_seconds"] = round(self.half_open_seconds, 3)
        return data


def breaker_stats(
    transitions: Iterable[Transition], start: float, end: float
) -> dict[str, BreakerStats]:
    """Per breaker that was not closed for the whole of ``[start, end)``: its stats. A
    breaker with no transition before the period is taken as closed at its start."""
    stats: dict[str, BreakerStats] = {}
    since: dict[str, float] = {}

    def spend(s: BreakerStats, until: float) -> None:
        spent = max(0.0, until - since[s.breaker])
        if s.state_at_end == "open":
            s.open_seconds += spent
        elif s.state_at_end == "half_open":
            s.half_open_seconds += spent

    for t in sorted(transitions, key=lambda t: t.at):
        if t.at >= end:
            break
        s = stats.setdefault(t.breaker, BreakerStats(t.breaker))
        if t.at < start:
            s.state_at_start = s.state_at_end = t.target
            since[t.breaker] = start
            continue
        since.setdefault(t.breaker, start)
        spend(s, t.at)
        s.state_at_end = t.target
        since[t.breaker] = t.at
        s.transitions += 1
        if t.source == "closed" and t.target == "open":
            s.flaps += 1
    for s in stats.values():
        spend(s, end)
    return {
        name: s
        for name, s in sorted(stats.items())
        if s.transitions or s.state_at_start != "closed"
    }
