"""The fleet's degradation level in Redis: evaluated by a beat job, overridden by operators.

One hash, ``P:degradation`` (the issue 8 contract): ``level`` (announced, what the fleet
applies), ``computed`` (the rules' level), ``reason``, ``since``, ``evaluated_at`` and the
override (``override_level``, ``override_reason``, ``override_expires``, ``override_by``).
Admission reads it inside the one admission script (``lua/degradation.lua``, the same
function as :meth:`DegradationState.status`), so an override — or its expiry — holds on
Redis time for every worker at once, without waiting for the next evaluation.

Every write is a script that returns the level announced before and after; a change
is logged (``degradation_level_changed``) and raised through the alert hooks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from reliability import scripts
from reliability.alerts import AlertHooks
from reliability.degradation.rules import Level, Rule, compute
from reliability.errors import ConfigurationError
from reliability.store import Store

log = structlog.get_logger("reliability.degradation")
EVENT = "degradation_level_changed"
_OVERRIDE = ("override_level", "override_reason", "override_expires", "override_by")
_FIELDS = ", ".join(f"'{name}'" for name in _OVERRIDE)
_SINCE = """
if after ~= before or not redis.call('HGET', KEYS[1], 'since') then
  redis.call('HSET', KEYS[1], 'since', string.format('%.6f', now))
end"""

# KEYS deg   ARGV now. The level in force, whether an override holds, then the hash.
READ = scripts.compose(
    "degradation",
    body="""
local o = redis.call('HMGET', KEYS[1], 'override_level', 'override_expires')
local active = o[1] and o[1] ~= '' and (tonumber(o[2] or '') or 0) > now
return {deg_level(KEYS[1]), active and 1 or 0, unpack(redis.call('HGETALL', KEYS[1]))}
""",
)
# KEYS deg   ARGV now, computed, reason. An expired override is removed here.
EVALUATE = scripts.compose(
    "degradation",
    body=f"""
local before = deg_name(redis.call('HGET', KEYS[1], 'level'))
local o = redis.call('HMGET', KEYS[1], 'override_level', 'override_expires')
local expired, after = '', deg_name(ARGV[2])
if o[1] and o[1] ~= '' then
  if (tonumber(o[2] or '') or 0) > now then
    after = deg_name(o[1])
  else
    expired = o[1]
    redis.call('HDEL', KEYS[1], {_FIELDS})
  end
end
redis.call('HSET', KEYS[1], 'computed', ARGV[2], 'reason', ARGV[3], 'level', after,
  'evaluated_at', string.format('%.6f', now))
{_SINCE}
return {{before, after, expired}}
""",
)
# KEYS deg   ARGV now, level, reason, seconds, by
OVERRIDE = scripts.compose(
    "degradation",
    body=f"""
local before = deg_name(redis.call('HGET', KEYS[1], 'level'))
local after = deg_name(ARGV[2])
redis.call('HSET', KEYS[1], 'override_level', after, 'override_reason', ARGV[3],
  'override_expires', string.format('%.6f', now + tonumber(ARGV[4])), 'override_by', ARGV[5],
  'level', after)
{_SINCE}
return {{before, after, ''}}
""",
)
# KEYS deg   ARGV now
CLEAR = scripts.compose(
    "degradation",
    body=f"""
local before = deg_name(redis.call('HGET', KEYS[1], 'level'))
local had = redis.call('HGET', KEYS[1], 'override_level') or ''
redis.call('HDEL', KEYS[1], {_FIELDS})
local after = deg_name(redis.call('HGET', KEYS[1], 'computed'))
redis.call('HSET', KEYS[1], 'level', after)
{_SINCE}
return {{before, after, had}}
""",
)


def degradation_key(store: Store) -> str:
    return f"{store.keys.prefix}:degradation"


def health_key(store: Store) -> str:
    """The health results hash (written by the health poll: component -> JSON)."""
    return f"{store.keys.prefix}:health"


@dataclass(frozen=True)
class Override:
    level: Level
    reason: str
    expires: float
    by: str
    active: bool  # not yet expired (Redis time)


@dataclass(frozen=True)
class Status:
    """The level in force now and how it came about."""

    level: Level
    computed: Level | None
    reason: str
    since: float | None
    evaluated_at: float | None
    override: Override | None

    def as_dict(self) -> dict[str, Any]:
        o = self.override
        return {
            "level": str(self.level),
            "computed": None if self.computed is None else str(self.computed),
            "reason": self.reason,
            "since": self.since,
            "evaluated_at": self.evaluated_at,
            "override": None
            if o is None
            else {
                "level": str(o.level),
                "reason": o.reason,
                "expires": o.expires,
                "by": o.by,
                "active": o.active,
            },
        }


def _level(value: str | None) -> Level | None:
    try:
        return None if value is None else Level(value.upper())
    except ValueError:
        return Level.NORMAL


def _number(value: str | None) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except ValueError:
        return None


class DegradationState:
    """Read, evaluate and override the degradation level (``now``: tests only)."""

    def __init__(self, store: Store, hooks: AlertHooks | None = None) -> None:
        self.store = store
        self.hooks = hooks
        self.key = degradation_key(store)

    def _run(self, lua: str, args: list[Any], now: float | None, action: str) -> list[Any]:
        reply: list[Any] = self.store.run(
            lua, [self.key], ["" if now is None else now, *args], action
        )
        return reply

    def status(self, now: float | None = None) -> Status:
        reply = self._run(READ, [], now, "degradation read")
        fields = dict(zip(reply[2::2], reply[3::2], strict=True))
        override = None
        if fields.get("override_level"):
            expires = _number(fields.get("override_expires")) or 0.0
            override = Override(
                level=_level(fields["override_level"]) or Level.NORMAL,
                reason=fields.get("override_reason", ""),
                expires=expires,
                by=fields.get("override_by", ""),
                active=bool(reply[1]),
            )
        return Status(
            level=Level(reply[0]),
            computed=_level(fields.get("computed")),
            reason=fields.get("reason", ""),
            since=_number(fields.get("since")),
            evaluated_at=_number(fields.get("evaluated_at")),
            override=override,
        )

    def set_override(
        self, level: Level | str, reason: str, seconds: float, by: str, now: float | None = None
    ) -> Status:
        """Hold the fleet at ``level`` for ``seconds`` (every override expires)."""
        try:
            wanted = Level(str(level).upper())
        except ValueError:
            raise ConfigurationError(
                f"unknown degradation level {level!r}; one of {[x.value for x in Level]}"
            ) from None
        if not reason.strip() or not by.strip():
            raise ConfigurationError("a degradation override needs a reason and who sets it")
        if not seconds > 0:
            raise ConfigurationError("a degradation override needs a positive duration")
        before, after, _ = self._run(
            OVERRIDE, [wanted.value, reason, seconds, by], now, "degradation override"
        )
        self._announce(
            before, after, operator=True, reason=f"override: {reason}", by=by, override=True
        )
        return self.status(now)

    def clear_override(self, now: float | None = None) -> Status:
        """Drop the override: the rules' level applies again at once."""
        before, after, had = self._run(CLEAR, [], now, "degradation clear")
        if had:
            self._announce(
                before, after, operator=True, reason=f"override {had} cleared", override=False
            )
        return self.status(now)

    def evaluate(
        self,
        rules: Iterable[Rule],
        breakers: Mapping[str, Mapping[str, Any]],
        *,
        max_age: float,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Compute the rules' level from the health hash and ``breakers`` (name ->
        snapshot), write it, and announce a change. What the job records."""
        raw = self.store.call("health read", lambda c: c.hgetall(health_key(self.store)))
        health = {str(name): str(value) for name, value in raw.items()}
        computed = compute(
            rules, health, breakers, now=time.time() if now is None else now, max_age=max_age
        )
        before, after, expired = self._run(
            EVALUATE, [computed.level.value, computed.reason], now, "degradation evaluate"
        )
        reason = computed.reason + (f"; override {expired} expired" if expired else "")
        self._announce(
            before, after, operator=False, reason=reason, override=after != computed.level
        )
        return {
            "level": after,
            "computed": computed.level.value,
            "changed": before != after,
            "reason": computed.reason,
        }

    def _announce(self, before: str, after: str, *, operator: bool, **context: Any) -> None:
        """Log and alert a change: a warning when the rules raised the level (what an
        operator did is information)."""
        if before == after:
            return
        up = Level(after).rank > Level(before).rank and not operator
        context = {"from": before, "to": after, **context}
        if self.hooks is None:
            (log.warning if up else log.info)(EVENT, **context)
        else:  # the hooks log it (worker.alerting), with the rest of the alert
            self.hooks.emit(EVENT, f"degradation level {before} -> {after}", context)


def breaker_snapshots(breakers: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Name -> snapshot of each breaker (a registry iterates its configured breakers)."""
    return {b.name: b.snapshot() for b in breakers}
