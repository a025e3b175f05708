"""The degradation guard: declared at import, decided inside the one admission script.

A task's plan is checked when it is declared (a misspelt level or action fails with a
hint). In the pipeline, a task declaring every guard still costs one admission script
per delivery whatever the level: the level is read by a fragment placed after the
idempotency check and before any commit, breaker or limit, so a degraded delivery takes
no lease, no trial slot and no tokens. The last good result is written by the settle
tail inside the completion script, and read by the admission that falls back.
"""

from __future__ import annotations

import re
from inspect import signature
from typing import Any

import pytest

from reliability import admission
from reliability.degradation import Degradation, DegradationState, LastGood, Level
from reliability.delivery import Delivery
from reliability.errors import ConfigurationError
from reliability.guard import Call, Fallback, Park, Skip
from reliability.ledger import Ledger
from reliability.pipeline import GUARDS, Pipeline
from reliability.runtime import Runtime, RuntimeConfig
from reliability.spec import TaskSpec, build
from reliability.store import Store


def report(report_id: str, day: str = "today") -> dict[str, Any]: ...


def cached_report(report_id: str, day: str = "today") -> dict[str, Any]:
    if report_id.startswith("none"):
        raise LookupError("no cached report")
    return {"report": report_id, "default": True}


def spec_of(**options: Any) -> TaskSpec:
    return build("t.report", options, signature(report), GUARDS)


# -- declaration (import time) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"degradation": {"SEVER": "skip"}}, "level 'SEVER' .* did you mean 'SEVERE'"),
        ({"degradation": {"severe": "skip"}}, "level 'severe' .* did you mean 'SEVERE'"),
        ({"degradation": {"SEVERE": "skp"}}, "action 'skp' at SEVERE .* did you mean 'skip'"),
        ({"degradation": {"SEVERE": ["skip"]}}, r"action \['skip'\] at SEVERE is not one of"),
        ({"degradation": {"NORMAL": "defer"}}, "at NORMAL a task runs"),
        ({"degradation": ["SEVERE"]}, "must map levels to actions"),
        ({"degradation": {}}, "must map levels to actions"),
        ({"degradation": {"CRITICAL": "fallback"}}, "must name at least one link"),
        (
            {"degradation": {"SEVERE": "skip"}, "degradation_fallback": cached_report},
            "used only at a 'fallback' level",
        ),
        ({"degradation_fallback": cached_report}, "needs a degradation plan"),
        (
            {"degradation": {"SEVERE": "fallback"}, "degradation_fallback": (LastGood(("id",)),)},
            r"LastGood key_args \['id'\] are not parameters",
        ),
        (
            {"degradation": {"SEVERE": "fallback"}, "degradation_fallback": ("stale",)},
            "neither callable nor LastGood",
        ),
        ({"degradaton": {"SEVERE": "skip"}}, "did you mean 'degradation'"),
    ],
)
def test_a_bad_declaration_fails_at_import_with_a_hint(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        spec_of(**options)


# -- admission, in process against real Redis --------------------------------------------

EVERY_GUARD = {
    "idempotency_key_args": ("report_id", "day"),
    "breaker": "payment",
    "rate_limits": ("payment-gateway",),
    "degradation": {"MODERATE": "defer", "SEVERE": "skip", "CRITICAL": "fallback"},
    "degradation_fallback": (LastGood(key_args=("report_id",)), cached_report),
}


class Counted:
    """A pipeline over a store whose script calls are counted by name."""

    def __init__(self, store: Store) -> None:
        self.store, self.calls = store, list[str]()
        self.rt = Runtime(store, RuntimeConfig(degradation_recheck_seconds=7.5))
        self.spec = spec_of(**EVERY_GUARD)
        self.pipeline = Pipeline(self.spec, self.rt)
        run = store.run

        def counting(lua: str, keys: list[str], args: list[Any], action: str) -> Any:
            self.calls.append(action)
            return run(lua, keys, args, action)

        store.run = counting  # type: ignore[method-assign]

    def call(self, task_id: str, report_id: str, day: str = "today") -> Call:
        d = Delivery(
            task_id=task_id,
            name="t.report",
            args=(report_id, day),
            kwargs={},
            owner_nonce=f"owner-{task_id}",
        )
        call = Call(self.spec, self.rt, d)
        for guard in GUARDS:
            guard.prepare(call)
        return call

    def admit(
        self, task_id: str, report_id: str, day: str = "today"
    ) -> tuple[Call, admission.Verdict]:
        call = self.call(task_id, report_id, day)
        self.calls.clear()
        verdict = self.pipeline._admit(call)
        assert self.calls == ["admission"], "one script call per delivery"
        return call, verdict


def test_the_level_is_checked_after_idempotency_and_before_every_commit(bare_store: Store) -> None:
    counted = Counted(bare_store)
    call = counted.call("t1", "r1")
    parts = [p for g in GUARDS if (p := g.part(call))]
    source = admission.script_for(tuple(p.fragment for p in parts)).source
    checks = re.findall(r"^-- (\w+)(?: x\d+)?$", source, flags=re.M)
    assert checks == ["idempotency", "degradation", "breaker", "ratelimit"]
    assert source.index("idem_check(KEYS[") < source.index("deg_level(KEYS[")
    assert source.index("deg_level(KEYS[") < source.index("cb_check(KEYS[")
    assert source.index("return {'degraded_skip'") < source.index("fence = idem_acquire(")
    undeclared = build("t.plain", {"idempotent": True}, signature(report), GUARDS)
    plain = Call(undeclared, counted.rt, call.d)
    assert not any(isinstance(g, Degradation) and g.part(plain) for g in GUARDS)


def test_each_level_is_one_admission_script_and_a_degraded_one_holds_nothing(
    bare_store: Store,
) -> None:
    counted = Counted(bare_store)
    state = DegradationState(bare_store)
    ledger = Ledger(bare_store)

    state.set_override(Level.SEVERE, "drill", 600, "test")
    call, verdict = counted.admit("t1", "r1")
    assert (verdict.decision, verdict.detail) == ("degraded_skip", "SEVERE")
    assert counted.pipeline._owner(verdict.decision).refused(call, verdict) == Skip(
        {"skipped": "degraded", "level": "SEVERE"}
    )
    assert [(e["task_id"], e["outcome"], e["detail"]) for e in ledger.tail(5)] == [
        ("t1", "skipped_degraded", "SEVERE")
    ]
    # No lease, no half-open trial, no tokens: the commits never ran.
    assert bare_store.client.zcard(bare_store.keys.leases) == 0
    assert counted.rt.breakers.get("payment").snapshot()["state"] == "closed"

    state.set_override(Level.MODERATE, "drill", 600, "test")
    call, verdict = counted.admit("t2", "r2")
    assert (verdict.decision, verdict.detail) == ("degraded_defer", "MODERATE")
    assert counted.pipeline._owner(verdict.decision).refused(call, verdict) == Park(
        7.5, "degraded MODERATE"
    )

    state.clear_override()
    _, verdict = counted.admit("t3", "r3")
    assert verdict.runs and verdict.fence == 1
    assert bare_store.client.zcard(bare_store.keys.leases) == 1


def test_a_fallback_serves_the_last_good_result_marked_stale(bare_store: Store) -> None:
    counted = Counted(bare_store)
    # A success at NORMAL: the settle tail keeps its result, in the completion script.
    call, verdict = counted.admit("t1", "r1")
    assert verdict.runs
    call.d.fence = verdict.fence
    counted.calls.clear()
    counted.pipeline.settlement.succeeded(call, {"rows": 3})
    assert counted.calls == ["completion"]

    DegradationState(bare_store).set_override(Level.CRITICAL, "drill", 600, "test")
    # The same idempotency key still returns its stored result: that check comes first.
    assert counted.admit("t2", "r1")[1].decision == "done"
    served = []
    # Another day of report r1 (another idempotency key, the same LastGood key), r2, none-1.
    for task_id, report_id, day in (("t3", "r1", "monday"), ("t4", "r2", ""), ("t5", "none-1", "")):
        call, verdict = counted.admit(task_id, report_id, day)
        assert (verdict.decision, verdict.detail) == ("degraded_fallback", "CRITICAL")
        served.append(counted.pipeline._owner(verdict.decision).refused(call, verdict))
    stale, default, deferred = served
    assert isinstance(stale, Fallback) and stale.detail == "degraded CRITICAL: last_good"
    value = stale.fn()
    assert value == {"value": {"rows": 3}, "stale": True, "cached_at": value["cached_at"]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value["cached_at"])
    assert isinstance(default, Fallback) and default.detail == "degraded CRITICAL: cached_report"
    assert default.fn() == {"report": "r2", "default": True}
    # No stale value and the next link failed: deferred, not failed.
    assert deferred == Park(7.5, "degraded CRITICAL")
