"""The admission script: one Lua call decides whether a delivery may run.

Each guard that takes part contributes a :class:`Fragment` — Lua ``check`` lines that
may return a verdict, and ``commit`` lines that run only once every check passed — with
the keys and arguments it needs. :func:`assemble` concatenates the fragments in
pipeline order into one script (cached by the combination), so a task pays one round
trip for all its guards and nothing for guards it does not declare.

In fragment Lua, ``$K1``/``$A1`` name the fragment's own first key/argument and
``$KB``/``$AB`` are its base offsets (``KEYS[$KB + 1]`` is ``$K1``). The base
script provides ``now``, ``settle(outcome, detail)`` (ledger entry, plus the delivery
record when one is part of the admission), and the variables ``fence``, ``dlv_key`` and
``run_extra`` (strings a commit appends to the ``run`` verdict, e.g. ``trial``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from reliability.scripts import compose

_TOKEN = re.compile(r"\$([KA])(\d+|B)")

# Base layout: KEYS[1] ledger; ARGV[1] now, [2] ledger maxlen, [3] task id, [4] name,
# [5] attempt, [6] delivery-record ttl (ms).
BASE_KEYS = 1
BASE_ARGS = 6

_HEADER = """
local fence = 0
local dlv_key = nil
local run_extra = {}
local function settle(outcome, detail)
  if dlv_key then delivery_finish(dlv_key, outcome, tonumber(ARGV[6])) end
  ledger_add(KEYS[1], ARGV[2], ARGV[3], ARGV[4], outcome, ARGV[5], detail)
end
"""


@dataclass(frozen=True)
class Fragment:
    """A guard's part of the admission script."""

    name: str
    libraries: tuple[str, ...]
    check: str
    commit: str = ""
    nkeys: int = 0
    nargs: int = 0


@dataclass
class Part:
    """A fragment plus the keys and arguments of this particular delivery."""

    fragment: Fragment
    keys: Sequence[str] = ()
    args: Sequence[Any] = ()


@dataclass
class Verdict:
    """What admission decided: ``run`` or a reason not to, with its detail."""

    decision: str
    detail: str = ""
    fence: int = 0
    now: float = 0.0
    extra: list[str] = field(default_factory=list)

    @property
    def runs(self) -> bool:
        return self.decision == "run"


def _bind(code: str, key_base: int, arg_base: int) -> str:
    def repl(match: re.Match[str]) -> str:
        kind, index = match.group(1), match.group(2)
        base = key_base if kind == "K" else arg_base
        if index == "B":  # the fragment's base offset, for loops over variable parts
            return str(base)
        return f"{'KEYS' if kind == 'K' else 'ARGV'}[{base + int(index)}]"

    return _TOKEN.sub(repl, code)


@cache
def assemble(fragments: tuple[Fragment, ...]) -> str:
    """The admission script for this ordered combination of fragments."""
    libraries: list[str] = ["delivery", "ledger"]
    checks: list[str] = []
    commits: list[str] = []
    key_base, arg_base = BASE_KEYS, BASE_ARGS
    for fragment in fragments:
        for library in fragment.libraries:
            if library not in libraries:
                libraries.append(library)
        checks.append(f"-- {fragment.name}\n" + _bind(fragment.check, key_base, arg_base))
        if fragment.commit:
            commits.append(_bind(fragment.commit, key_base, arg_base))
        key_base += fragment.nkeys
        arg_base += fragment.nargs
    body = "\n".join(
        [
            _HEADER,
            *checks,
            *commits,
            "return {'run', tostring(fence), string.format('%.6f', now), unpack(run_extra)}",
        ]
    )
    return compose(*libraries, body=body)


def flatten(parts: Sequence[Part]) -> tuple[tuple[Fragment, ...], list[str], list[Any]]:
    """The fragment combination and the concatenated keys/arguments of the parts."""
    keys: list[str] = []
    args: list[Any] = []
    for part in parts:
        if len(part.keys) != part.fragment.nkeys or len(part.args) != part.fragment.nargs:
            raise ValueError(f"fragment {part.fragment.name}: wrong number of keys/args")
        keys.extend(part.keys)
        args.extend(part.args)
    return tuple(p.fragment for p in parts), keys, args


def parse(reply: Sequence[Any]) -> Verdict:
    decision = str(reply[0])
    if decision == "run":
        return Verdict("run", fence=int(reply[1]), now=float(reply[2]),
                       extra=[str(x) for x in reply[3:]])
    detail = "" if len(reply) < 2 or reply[1] is None else str(reply[1])
    return Verdict(decision, detail, extra=[str(x) for x in reply[2:]])


# Guards whose fragments are always available to the pipeline.
DELIVERY = Fragment(
    name="delivery",
    libraries=("delivery",),
    nkeys=1,
    nargs=1,
    check="""
dlv_key = $K1
local dv, dd = delivery_admit($K1, tonumber($A1), tonumber(ARGV[6]))
if dv == 'finished' then
  ledger_add(KEYS[1], ARGV[2], ARGV[3], ARGV[4], 'duplicate_delivery', ARGV[5], dd)
  return {'duplicate', dd}
end
if dv == 'poison' then return {'poison', dd} end
""",
)

DEFER = Fragment(
    name="defer",
    libraries=("deferral",),
    nkeys=1,
    nargs=2,
    check="""
local fv, fd = defer_claim($K1, $A1, tonumber($A2))
if fv then
  settle('duplicate_delivery', fd)
  return {'duplicate', fd}
end
""",
)
