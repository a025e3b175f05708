"""The degradation guard: what a task does at each degradation level, decided at admission.

A task declares it on the decorator::

    degradation={"MODERATE": "defer", "SEVERE": "skip", "CRITICAL": "fallback"},
    degradation_fallback=(LastGood(key_args=("report_id",)), cached_report),

``run`` (also every level left out), ``defer`` (park the message, no attempt spent, and
look again after the recheck delay), ``skip`` (a non-critical task ends unrun, recorded
``skipped_degraded``) or ``fallback`` (the fallback chain serves the call,
:mod:`reliability.degradation.fallback`). A misspelt level or action fails at import.

The level is read inside the one admission script (``lua/degradation.lua``: an operator's
override and its expiry on Redis time), so the guard adds no round trip; a task that
declares nothing reads nothing. Its place in ``GUARDS``: after the redelivery and
deferral guards (a duplicate copy is dropped, not deferred again) and after the
idempotency check (a completed key still returns its stored result; a key running
elsewhere waits), before any guard commits (a degraded delivery takes no lease) and
before the breaker and rate limits (it takes no half-open trial slot, no tokens).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from reliability import metrics
from reliability.completion import result_json
from reliability.degradation.fallback import chain_of, check_chain, last_good, serve
from reliability.degradation.rules import Level
from reliability.degradation.state import degradation_key
from reliability.guard import Action, Call, Ending, Fallback, Guard, Park, Skip, require
from reliability.ledger import Outcome
from reliability.scripts import Fragment, Part

if TYPE_CHECKING:
    from reliability.admission import Verdict

log = structlog.get_logger("reliability.degradation")

# What a task may do at a level, and the letter the admission script gets for it.
ACTIONS = {"run": "r", "defer": "d", "skip": "s", "fallback": "f"}


class DegradationVerdict(StrEnum):
    DEFER = "degraded_defer"  # park: look again after the recheck delay
    SKIP = "degraded_skip"  # ended unrun (recorded skipped_degraded in the script)
    FALLBACK = "degraded_fallback"  # serve the fallback chain (detail: the level)


# KEYS deg (the level hash), stale (last good result, '' if none)   ARGV plan (one letter
# per level, NORMAL first: r run, d defer, s skip, f fallback)
ADMISSION = Fragment(
    name="degradation",
    libraries=("degradation",),
    keys=("deg", "stale"),
    args=("plan",),
    code="""
local dg_level = deg_level(@deg)
local dg_act = string.sub($plan, DEG_RANK[dg_level] + 1, DEG_RANK[dg_level] + 1)
if dg_act == 's' then
  settle('skipped_degraded', dg_level)  -- Outcome.SKIPPED_DEGRADED
  return {'degraded_skip', dg_level}
elseif dg_act == 'd' then
  return {'degraded_defer', dg_level}
elseif dg_act == 'f' then
  return {'degraded_fallback', dg_level, (@stale ~= '' and redis.call('GET', @stale)) or ''}
end
""",
)

# A success keeps its result as the task's last good one: {"cached_at": now, "value": ...}.
# KEYS stale   ARGV result (JSON), ttl_ms
SETTLE = Fragment(
    name="degradation",
    keys=("stale",),
    args=("result", "ttl_ms"),
    code="""redis.call('SET', @stale, '{"cached_at":' .. string.format('%.6f', now) ..
  ',"value":' .. $result .. '}', 'PX', $ttl_ms)""",
)


def _suggest(word: str, choices: list[str]) -> str:
    for spelling in (word, word.upper(), word.lower()):
        close = difflib.get_close_matches(spelling, choices, n=1)
        if close:
            return f"; did you mean {close[0]!r}?"
    return ""


def check_plan(task: str, plan: Any) -> str:
    """The declared ``degradation`` mapping as the admission plan (one letter per level)."""
    require(
        isinstance(plan, Mapping) and bool(plan),
        task,
        'degradation must map levels to actions, e.g. {"SEVERE": "skip"}',
    )
    levels, actions = [x.value for x in Level], list(ACTIONS)
    for level, action in plan.items():
        require(
            level in levels,
            task,
            f"degradation level {level!r} is not one of {levels}{_suggest(str(level), levels)}",
        )
        require(
            action in actions,
            task,
            f"degradation action {action!r} at {level} is not one of {actions}"
            f"{_suggest(str(action), actions)}",
        )
    require(plan.get("NORMAL", "run") == "run", task, "at NORMAL a task runs")
    return "".join(ACTIONS[plan.get(level, "run")] for level in levels)


class Degradation(Guard):
    """What the task does at the fleet's degradation level (read at admission)."""

    name = "degradation"
    verdicts = DegradationVerdict
    options = {
        "degradation": "degradation: level -> run | defer | skip | fallback (others run)",
        "degradation_fallback": "degradation: the fallback chain (callables, LastGood(...))",
    }

    def check(self, task: str, values: Mapping[str, Any], signature: inspect.Signature) -> None:
        plan, chain = values.get("degradation"), chain_of(values.get("degradation_fallback"))
        if plan is None:
            require(not chain, task, "degradation_fallback needs a degradation plan")
            return
        letters = check_plan(task, plan)
        if "f" in letters:
            check_chain(task, chain, signature)
        else:
            require(not chain, task, "degradation_fallback is used only at a 'fallback' level")

    def part(self, call: Call) -> Part | None:
        plan = call.spec.option("degradation")
        if plan is None:
            return None
        letters = call.spec.cached("degradation_plan", lambda: check_plan(call.spec.name, plan))
        link = last_good(chain_of(call.spec.option("degradation_fallback")))
        stale = link.key(call) if link is not None and "f" in letters else ""
        return Part(ADMISSION, [degradation_key(call.rt.store), stale], [letters])

    def refused(self, call: Call, verdict: Verdict) -> Action:
        d, level = call.d, verdict.detail
        if verdict.decision == DegradationVerdict.SKIP:
            log.info("task_skipped_degraded", degradation_level=level)
            metrics.OUTCOMES.labels(d.name, Outcome.SKIPPED_DEGRADED).inc()
            return Skip({"skipped": "degraded", "level": level})
        if verdict.decision == DegradationVerdict.FALLBACK:
            chain = chain_of(call.spec.option("degradation_fallback"))

            def failed(link: str, exc: Exception) -> None:
                log.warning(
                    "degradation_fallback_link_failed",
                    degradation_level=level,
                    link=link,
                    error_type=type(exc).__name__,
                    error=call.rt.masker.text(str(exc)),
                )

            cached = verdict.extra[0] if verdict.extra else None
            served = serve(chain, d.args, d.kwargs, cached, failed)
            if served is not None:
                value = served.value
                return Fallback(
                    lambda *_a, **_k: value,
                    f"degraded {level}: {served.link}",
                    "task_degraded_fallback_served",
                    {"degradation_level": level, "link": served.link},
                )
        delay = call.rt.config.degradation_recheck_seconds
        log.info("task_deferred_degraded", degradation_level=level, recheck_in=delay)
        return Park(delay, f"degraded {level}", reserved=d.reserved)

    def settle(self, call: Call, ending: Ending) -> Part | None:
        if ending.kind != "success" or call.spec.option("degradation") is None:
            return None
        link = last_good(chain_of(call.spec.option("degradation_fallback")))
        if link is None:
            return None
        return Part(
            SETTLE, [link.key(call)], [result_json(ending.result), int(link.ttl_seconds * 1000)]
        )
