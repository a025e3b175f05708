"""The breaker guard: a task's circuit breaker, checked inside the one admission script.

Open means the message is parked until the breaker may half-open — no retry attempt is
spent — or the task's ``breaker_fallback`` serves the call. Half-open admits a fixed
number of trial calls fleet-wide; a trial's slot is a lease the worker's main process
renews while the body runs. Every call that ran is recorded by the settle tail, in the
same script as the call's outcome.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from reliability import scripts
from reliability.breaker.circuit import CircuitBreaker
from reliability.breaker.config import CFG_ARGS
from reliability.guard import Action, Call, Ending, Fallback, Guard, Park, Unresolved, require
from reliability.lease import Holding, Lease
from reliability.scripts import Fragment, Part

if TYPE_CHECKING:
    from reliability.admission import Verdict
    from reliability.runtime import Runtime

log = structlog.get_logger("reliability.breaker")
CFG = tuple(f"cfg{i}" for i in range(CFG_ARGS))

# KEYS trials   ARGV now, owner, seconds: a running half-open trial keeps its slot (the
# lease keeper renews it from the worker's main process, reliability.lease).
RENEW_TRIAL = scripts.compose(
    body="""
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[2])
  return 1
end
return 0
"""
)


class BreakerVerdict(StrEnum):
    OPEN = "breaker_open"  # open (or forced open): wait until it may half-open
    BUSY = "breaker_busy"  # half-open and every trial slot taken: look again soon


# KEYS state hash, window, trial leases, transitions stream   ARGV name, cfg x 11, owner
ADMISSION = Fragment(
    name="breaker",
    libraries=("breaker",),
    keys=("h", "w", "t", "e"),
    args=("name", *CFG, "owner"),
    code="""
local cb_c = cb_cfg(ARGV, $$ + 2)
local cbv, cbw = cb_check(@h, @w, @t, @e, $name, cb_c)
if cbv == 'open' or cbv == 'busy' then return {'breaker_' .. cbv, string.format('%.6f', cbw)} end
""",
    commit="""if cbv == 'trial' then
  cb_take_trial(@t, $owner, cb_c)
  run_extra[#run_extra + 1] = 'trial'
end""",
)

# Record a call that ran (or free its trial slot without judging it: outcome "ignore").
# KEYS as above   ARGV name, outcome, duration, cfg x 11, owner
SETTLE = Fragment(
    name="breaker",
    libraries=("breaker",),
    keys=("h", "w", "t", "e"),
    args=("name", "outcome", "duration", *CFG, "owner"),
    code="cb_record(@h, @w, @t, @e, $name, cb_cfg(ARGV, $$ + 4), $owner, $outcome, "
    "tonumber($duration))",
)


def breaker_of(call: Call) -> CircuitBreaker | None:
    name = call.spec.option("breaker")
    return call.rt.breakers.get(name) if name else None


class Breaker(Guard):
    """The task's named breaker (settings), shared by the fleet."""

    name = "breaker"
    verdicts = BreakerVerdict
    options = {
        "breaker": "circuit breaker: the name of a breaker in settings (shared fleet-wide)",
        "breaker_fallback": "circuit breaker: a callable serving the call while it is open",
    }

    def check(self, task: str, values: Mapping[str, Any], signature: inspect.Signature) -> None:
        fallback = values.get("breaker_fallback")
        require(fallback is None or callable(fallback), task, "breaker_fallback must be callable")
        require(
            fallback is None or bool(values.get("breaker")),
            task,
            "breaker_fallback needs a breaker",
        )

    def tag(self, values: Mapping[str, Any]) -> str | None:
        return values.get("breaker") or None

    def unresolved(self, options: Mapping[str, Any], rt: Runtime) -> list[Unresolved]:
        name = options.get("breaker")
        if name and name not in rt.breakers.configs:
            return [("breaker", str(name), sorted(rt.breakers.configs))]
        return []

    def part(self, call: Call) -> Part | None:
        breaker = breaker_of(call)
        if breaker is None:
            return None
        return Part(ADMISSION, breaker.keys, [breaker.name, *breaker.config.args(), call.d.owner])

    def refused(self, call: Call, verdict: Verdict) -> Action:
        name = call.spec.option("breaker")
        wait = float(verdict.detail)
        log.info(
            "circuit_breaker_rejected_call",
            breaker=name,
            reason=verdict.decision,
            retry_in=round(wait, 3),
        )
        fallback = call.spec.option("breaker_fallback")
        if fallback is not None:
            return Fallback(
                fallback,
                f"breaker {name} {verdict.decision}",
                "circuit_breaker_fallback_served",
                {"breaker": name},
            )
        if verdict.decision == BreakerVerdict.BUSY:
            # Trial slots free when a trial ends, usually long before their lease expires.
            wait = min(wait, call.rt.config.recheck_seconds)
        return Park(wait, verdict.decision, reserved=call.d.reserved)

    def settle(self, call: Call, ending: Ending) -> Part | None:
        breaker = breaker_of(call)
        if breaker is None:
            return None
        outcome = "ignore" if ending.kind == "ignore" else breaker.config.classify(ending.error)
        return Part(
            SETTLE,
            breaker.keys,
            [breaker.name, outcome, ending.duration, *breaker.config.args(), call.d.owner],
        )

    def hold(self, call: Call, holding: Holding) -> None:
        breaker = breaker_of(call)
        if breaker is not None:
            seconds = breaker.config.trial_lease_seconds
            holding.leases.append(
                Lease(RENEW_TRIAL, [breaker.keys[2]], ["", holding.owner, seconds], seconds)
            )
