"""The admission script: one Lua call decides whether a delivery may run.

Each guard that takes part contributes a :class:`~reliability.scripts.Fragment` — Lua
``code`` that may return a verdict, and ``commit`` code that runs only once every check
passed — with named keys and arguments. :func:`script_for` binds the fragments, in the
pipeline's guard order, after the base script's own names (one script per combination,
cached), so a task pays one round trip for all its guards and nothing for the guards it
does not declare.

The base script gives fragments ``now``, ``settle(outcome, detail)`` (ledger entry,
plus the delivery record when one is part of the admission), ``record(outcome, detail)``
(ledger entry only), ``dlv_ttl`` (ms), ``task_id``, ``task_name`` and the variables
``fence``, ``dlv_key`` and ``run_extra`` (strings a commit appends to the ``run``
verdict, e.g. ``trial``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reliability.scripts import COMMITS, FRAGMENTS, Fragment, Part, Script, script

BASE = script(
    "delivery",
    "ledger",
    keys=("ledger",),
    args=("ledger_max", "task_id", "name", "attempt", "dlv_ttl_ms"),
    body=f"""
local fence = 0
local dlv_key = nil
local run_extra = {{}}
local dlv_ttl = tonumber($dlv_ttl_ms)
local task_id = $task_id
local task_name = $name
local function record(outcome, detail)
  ledger_add(@ledger, $ledger_max, $task_id, $name, outcome, $attempt, detail)
end
local function settle(outcome, detail)
  if dlv_key then delivery_finish(dlv_key, outcome, dlv_ttl) end
  record(outcome, detail)
end
{FRAGMENTS}
{COMMITS}
return {{'run', tostring(fence), string.format('%.6f', now), unpack(run_extra)}}
""",
)


@dataclass
class Verdict:
    """What admission decided: ``run`` or a guard's reason not to, with its detail."""

    decision: str
    detail: str = ""
    fence: int = 0
    now: float = 0.0
    extra: list[str] = field(default_factory=list)

    @property
    def runs(self) -> bool:
        return self.decision == "run"


def script_for(fragments: tuple[Fragment, ...]) -> Script:
    """The admission script for this ordered combination of fragments (cached)."""
    return BASE.extended(fragments)


def assemble(fragments: tuple[Fragment, ...]) -> str:
    """The admission script's source for this ordered combination of fragments."""
    return script_for(fragments).source


def layout(
    parts: Sequence[Part],
    *,
    ledger: str,
    ledger_max: int,
    task_id: str,
    name: str,
    attempt: int,
    dlv_ttl_ms: int,
    now: Any = "",
) -> tuple[Script, list[str], list[Any]]:
    """The script, KEYS and ARGV of one admission."""
    script_ = script_for(tuple(p.fragment for p in parts))
    keys, args = script_.layout(
        {"ledger": ledger},
        {
            "ledger_max": ledger_max,
            "task_id": task_id,
            "name": name,
            "attempt": attempt,
            "dlv_ttl_ms": dlv_ttl_ms,
        },
        parts,
        now=now,
    )
    return script_, keys, args


def parse(reply: Sequence[Any]) -> Verdict:
    decision = str(reply[0])
    if decision == "run":
        return Verdict(
            "run", fence=int(reply[1]), now=float(reply[2]), extra=[str(x) for x in reply[3:]]
        )
    detail = "" if len(reply) < 2 or reply[1] is None else str(reply[1])
    return Verdict(decision, detail, extra=[str(x) for x in reply[2:]])
