"""Degradation levels (issue 8, seed 003): NORMAL, MINOR, MODERATE, SEVERE, CRITICAL.

* :mod:`~reliability.degradation.rules` — the levels and the rules that compute one from
  health results and breaker states (pure, unit-tested with a fixed clock);
* :mod:`~reliability.degradation.state` — the level in Redis: evaluated by a beat job,
  overridden by operators (with an expiry), changes logged and alerted;
* :mod:`~reliability.degradation.guard` — the guard that applies a task's declared plan
  (run, defer, skip, fall back) inside the one admission script;
* :mod:`~reliability.degradation.fallback` — fallback chains, and ``LastGood``: the last
  successful result, served marked stale.
"""

from reliability.degradation.fallback import LastGood
from reliability.degradation.guard import Degradation, DegradationVerdict
from reliability.degradation.rules import DEFAULT_RULES, Level, Rule, compute
from reliability.degradation.state import DegradationState, Status, breaker_snapshots

__all__ = [
    "DEFAULT_RULES",
    "Degradation",
    "DegradationState",
    "DegradationVerdict",
    "LastGood",
    "Level",
    "Rule",
    "Status",
    "breaker_snapshots",
    "compute",
]
