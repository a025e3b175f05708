"""Degradation rules (pure, fixed clock) and the level in Redis: evaluation, override, expiry.

The rules compute a level from health results (the health hash's JSON values) and
breaker snapshots; the highest matching level wins. The state tests run the real
scripts with a fixed ``now`` (Redis time in production), so an override's expiry is
checked to the second: before it the override holds, after it the rules' level — in
``status()`` and in the admission fragment alike, before any evaluation ran again.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from config.settings import DegradationRuleSettings, Settings
from reliability import admission
from reliability.alerts import AlertHooks
from reliability.degradation import DEFAULT_RULES, DegradationState, Level, Rule, compute
from reliability.degradation.guard import ADMISSION
from reliability.degradation.state import degradation_key, health_key
from reliability.errors import ConfigurationError
from reliability.scripts import Part
from reliability.store import Store
from worker.celeryconfig import degradation_rules

NOW = 1_000_000.0
CLOSED = {"state": "closed", "mode": "normal"}
OPEN = {"state": "open", "mode": "normal"}


def health(**components: str) -> dict[str, str]:
    """Health hash values as the health poll writes them (checked 10 s before NOW)."""
    return {
        name.replace("_", ":"): json.dumps(
            {"status": status, "latency_ms": 3.5, "checked_at": NOW - 10, "error": None}
        )
        for name, status in components.items()
    }


def level_of(h: dict[str, str], breakers: dict[str, Any] | None = None) -> Level:
    return compute(DEFAULT_RULES, h, breakers or {}, now=NOW, max_age=300).level


# -- rules (pure) ------------------------------------------------------------------------


def test_no_rule_matching_is_normal() -> None:
    result = compute(
        DEFAULT_RULES, health(redis="healthy"), {"payment": CLOSED}, now=NOW, max_age=60
    )
    assert result.level is Level.NORMAL
    assert result.reason == "no rule matched"


def test_the_highest_matching_level_wins_and_the_reason_names_its_rules() -> None:
    result = compute(
        DEFAULT_RULES,
        health(provider_payment="unhealthy", provider_export="degraded", redis="healthy"),
        {"payment": OPEN, "notification": CLOSED},
        now=NOW,
        max_age=300,
    )
    # provider unhealthy -> MODERATE beats provider degraded and one open breaker (MINOR).
    assert result == type(result)(Level.MODERATE, "provider:payment unhealthy")
    assert level_of(health(redis="unhealthy", provider_payment="unhealthy")) is Level.CRITICAL


def test_a_degraded_rule_also_matches_unhealthy_and_globs_match_names() -> None:
    assert level_of(health(provider_export="degraded")) is Level.MINOR
    assert level_of(health(provider_export="unhealthy")) is Level.MODERATE
    assert level_of(health(providers="unhealthy")) is Level.NORMAL  # "providers" != provider:*
    assert level_of(health(workers="degraded")) is Level.NORMAL  # workers: unhealthy only
    assert level_of(health(workers="unhealthy")) is Level.SEVERE


def test_breaker_counts_include_forced_open_but_not_shadow_or_disabled() -> None:
    opened = {"a": OPEN, "b": {"state": "closed", "mode": "forced_open"}}
    assert level_of({}, opened) is Level.MODERATE
    assert level_of({}, {**opened, "c": OPEN}) is Level.SEVERE
    quiet = {"a": {"state": "open", "mode": "shadow"}, "b": {"state": "open", "mode": "disabled"}}
    assert level_of({}, quiet) is Level.NORMAL
    assert level_of({}, {"a": {"state": "half_open", "mode": "normal"}}) is Level.NORMAL
    rules = [Rule(Level.SEVERE, breaker="pay*")]
    result = compute(rules, {}, {"payment": OPEN, "export": OPEN}, now=NOW, max_age=1)
    assert (result.level, result.reason) == (Level.SEVERE, "breaker payment open")


def test_stale_and_unreadable_health_is_ignored_and_said_so() -> None:
    old = {"provider:payment": json.dumps({"status": "unhealthy", "checked_at": NOW - 301})}
    result = compute(DEFAULT_RULES, {**old, "redis": "not json"}, {}, now=NOW, max_age=300)
    assert result.level is Level.NORMAL
    assert result.reason == "no rule matched (ignored: provider:payment stale, redis unreadable)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": Level.MINOR}, "exactly one of"),
        ({"level": Level.MINOR, "component": "redis", "breakers_open": 2}, "exactly one of"),
        ({"level": Level.NORMAL, "component": "redis"}, "NORMAL is what no rule"),
        ({"level": "severe", "component": "redis"}, "unknown level 'severe'"),
        ({"level": Level.MINOR, "component": "redis", "status": "down"}, "status must be"),
        ({"level": Level.MINOR, "breakers_open": 0}, "at least 1"),
    ],
)
def test_a_bad_rule_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Rule(**kwargs)


def test_rules_come_from_settings_else_the_defaults() -> None:
    assert degradation_rules(Settings()) == DEFAULT_RULES
    settings = Settings(
        degradation={"rules": [{"breaker": "payment", "level": "MODERATE"}], "recheck_seconds": 5}
    )
    assert degradation_rules(settings) == (Rule(Level.MODERATE, breaker="payment"),)
    with pytest.raises(ValueError, match="exactly one of"):
        DegradationRuleSettings(level="MINOR", component="redis", breaker="payment")
    with pytest.raises(ValueError, match="MINOR"):
        DegradationRuleSettings(level="minor", component="redis")  # type: ignore[arg-type]


# -- the level in Redis (fixed clock) ----------------------------------------------------


class Recorder:
    """Alert hooks that keep what they were given."""

    def __init__(self) -> None:
        self.alerts: list[tuple[str, str, dict[str, Any]]] = []
        self.hooks = AlertHooks()
        self.hooks.add_log_hook(lambda *alert: self.alerts.append(alert))


def admitted_level(store: Store, now: float) -> str:
    """What the admission script decides for a task that skips at every degraded level."""
    part = Part(ADMISSION, [degradation_key(store), ""], ["rssss"])
    script, keys, args = admission.layout(
        [part],
        ledger=f"{store.keys.prefix}:ledger",
        ledger_max=100,
        task_id="t",
        name="n",
        attempt=1,
        dlv_ttl_ms=1000,
        now=now,
    )
    reply = store.run(script.source, keys, args, "admission")
    return "NORMAL" if reply[0] == "run" else str(reply[1])


def test_evaluation_writes_the_level_and_alerts_only_on_a_change(bare_store: Store) -> None:
    recorder = Recorder()
    state = DegradationState(bare_store, recorder.hooks)
    assert state.status(NOW).level is Level.NORMAL  # an empty store
    bare_store.client.hset(health_key(bare_store), mapping=health(provider_payment="unhealthy"))
    result = state.evaluate(DEFAULT_RULES, {}, max_age=300, now=NOW)
    assert result == {
        "level": "MODERATE",
        "computed": "MODERATE",
        "changed": True,
        "reason": "provider:payment unhealthy",
    }
    assert state.evaluate(DEFAULT_RULES, {}, max_age=300, now=NOW + 60)["changed"] is False
    status = state.status(NOW + 61)
    assert (status.level, status.computed, status.since, status.evaluated_at) == (
        Level.MODERATE,
        Level.MODERATE,
        NOW,
        NOW + 60,
    )
    assert [(event, message) for event, message, _ in recorder.alerts] == [
        ("degradation_level_changed", "degradation level NORMAL -> MODERATE")
    ]
    assert recorder.alerts[0][2] == {
        "from": "NORMAL",
        "to": "MODERATE",
        "reason": "provider:payment unhealthy",
        "override": False,
    }


def test_an_override_holds_until_it_expires_then_the_rules_level_applies(bare_store: Store) -> None:
    recorder = Recorder()
    state = DegradationState(bare_store, recorder.hooks)
    state.evaluate(DEFAULT_RULES, {"payment": OPEN}, max_age=300, now=NOW)  # MINOR
    status = state.set_override("severe", "provider outage", 60, "ops", now=NOW + 1)
    assert status.level is Level.SEVERE and status.computed is Level.MINOR
    assert status.override is not None and status.override.active
    assert (status.override.expires, status.override.by) == (NOW + 61, "ops")
    # An evaluation while it holds keeps the override's level.
    assert state.evaluate(DEFAULT_RULES, {"payment": OPEN}, max_age=300, now=NOW + 30) == {
        "level": "SEVERE",
        "computed": "MINOR",
        "changed": False,
        "reason": "1 breaker(s) open: payment",
    }
    # Up to its expiry, on the script's clock, status and admission both see SEVERE ...
    assert state.status(NOW + 60.9).level is Level.SEVERE
    assert admitted_level(bare_store, NOW + 60.9) == "SEVERE"
    # ... and after it the rules' level, before any evaluation ran again.
    expired = state.status(NOW + 61.1)
    assert expired.level is Level.MINOR and expired.override is not None
    assert not expired.override.active
    assert admitted_level(bare_store, NOW + 61.1) == "MINOR"
    # The next evaluation removes the expired override and announces the change.
    result = state.evaluate(DEFAULT_RULES, {"payment": OPEN}, max_age=300, now=NOW + 62)
    assert (result["level"], result["changed"]) == ("MINOR", True)
    assert state.status(NOW + 62).override is None
    assert [alert[2]["to"] for alert in recorder.alerts] == ["MINOR", "SEVERE", "MINOR"]
    assert recorder.alerts[1][2] == {
        "from": "MINOR",
        "to": "SEVERE",
        "reason": "override: provider outage",
        "by": "ops",
        "override": True,
    }
    assert recorder.alerts[2][2]["reason"] == "1 breaker(s) open: payment; override SEVERE expired"


def test_clearing_an_override_hands_the_level_back_to_the_rules_at_once(bare_store: Store) -> None:
    recorder = Recorder()
    state = DegradationState(bare_store, recorder.hooks)
    state.set_override(Level.CRITICAL, "drill", 3600, "alice", now=NOW)
    assert admitted_level(bare_store, NOW + 1) == "CRITICAL"
    status = state.clear_override(now=NOW + 2)
    assert (status.level, status.override, status.since) == (Level.NORMAL, None, NOW + 2)
    assert admitted_level(bare_store, NOW + 3) == "NORMAL"
    assert [(a[2]["from"], a[2]["to"]) for a in recorder.alerts] == [
        ("NORMAL", "CRITICAL"),
        ("CRITICAL", "NORMAL"),
    ]
    assert state.clear_override(now=NOW + 4).level is Level.NORMAL
    assert len(recorder.alerts) == 2  # nothing to clear: nothing announced


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("SEVER", "r", 60, "ops"), "unknown degradation level 'SEVER'"),
        (("SEVERE", " ", 60, "ops"), "needs a reason"),
        (("SEVERE", "r", 60, ""), "needs a reason and who"),
        (("SEVERE", "r", 0, "ops"), "positive duration"),
    ],
)
def test_a_bad_override_is_refused_and_changes_nothing(
    bare_store: Store, args: tuple[Any, ...], message: str
) -> None:
    state = DegradationState(bare_store)
    with pytest.raises(ConfigurationError, match=message):
        state.set_override(*args, now=NOW)
    assert bare_store.client.exists(degradation_key(bare_store)) == 0


def test_a_stray_value_in_the_hash_reads_as_normal(bare_store: Store) -> None:
    bare_store.client.hset(degradation_key(bare_store), mapping={"level": "PANIC"})
    assert DegradationState(bare_store).status(NOW).level is Level.NORMAL
    assert admitted_level(bare_store, NOW) == "NORMAL"
    bare_store.client.hset(degradation_key(bare_store), mapping={"level": "severe"})
    assert admitted_level(bare_store, NOW) == "SEVERE"
