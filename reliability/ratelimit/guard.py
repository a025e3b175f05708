"""The rate-limits guard: every limit a task declares, checked and reserved together in
the one admission script; concurrency places freed by the settle tail on every ending."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any

import structlog

from reliability import metrics, scripts
from reliability.guard import Action, Call, Ending, Guard, Park, Unresolved, require
from reliability.lease import Holding, Lease
from reliability.ratelimit.limit import RateLimit, limit_keys
from reliability.scripts import Fragment, Part
from reliability.store import Store

if TYPE_CHECKING:
    from reliability.admission import Verdict
    from reliability.runtime import Runtime

log = structlog.get_logger("reliability.ratelimit")

# KEYS places   ARGV now, owner, seconds: the concurrency places a holder took (owner,
# owner#2, ...: see ratelimit.lua rl_commit) stay taken while it runs (renewed by the
# lease keeper from the worker's main process, reliability.lease).
RENEW_PLACES = scripts.compose(
    body="""
local n = 0
local member = ARGV[2]
while redis.call('ZSCORE', KEYS[1], member) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), member)
  n = n + 1
  member = ARGV[2] .. '#' .. (n + 1)
end
if n > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(ARGV[3]) + 1) * 1000)) end
return n
"""
)


class LimitVerdict(StrEnum):
    DELAY = "limit_delay"  # a slot is reserved for later: park the message until then
    BUSY = "limit_busy"  # a concurrency limit is full (or no slot found): look again


@cache
def fragment(count: int, reserved: bool = False) -> Fragment:
    """The admission fragment for ``count`` limits, checked and reserved together.

    A first delivery reserves the earliest time every limit (and its start gate) allows:
    now, or a future slot the message is parked until. A ``reserved`` copy (parked with
    its slot) only passes the start gate — and takes its concurrency places — when it
    comes back. KEYS per limit: K, O. ARGV: owner, then per limit kind, p1, p2, cost, name.
    """
    head = f"""
local rl_n, rl_kb, rl_ab = {count}, @@, $$ + 1
local rl_at = now
local rl_p = {{}}
for i = 0, rl_n - 1 do
  local a = rl_ab + 5 * i
  local p1, p2 = rl_params(KEYS[rl_kb + 2 * i + 2], ARGV[a + 2], ARGV[a + 3])
  rl_p[i] = {{ARGV[a + 1], KEYS[rl_kb + 2 * i + 1], p1, p2, tonumber(ARGV[a + 4]), ARGV[a + 5]}}
end
local function rl_earliest_gated(p, t)
  local at = rl_earliest(p[1], p[2], p[3], p[4], p[5], t)
  if at == nil or p[1] == 'concurrency' then return at end
  return rl_gate_free(p[1], p[2], p[3], p[4], p[5], at)
end
local function rl_start_all(reserve)
  for i = 0, rl_n - 1 do
    local p = rl_p[i]
    if reserve or p[1] == 'concurrency' then
      rl_commit(p[1], p[2], p[3], p[4], p[5], rl_at, $owner)
    end
    if p[1] ~= 'concurrency' then rl_start(p[1], p[2], p[3], p[4], p[5], $owner) end
  end
end
"""
    if reserved:
        check = (
            head
            + """
for i = 0, rl_n - 1 do
  local p = rl_p[i]
  local t
  if p[1] == 'concurrency' then t = rl_earliest(p[1], p[2], p[3], p[4], p[5], now)
  else t = rl_gate_free(p[1], p[2], p[3], p[4], p[5], now) end
  if t == nil then return {'limit_busy', '1.000000', p[6]} end
  if t > rl_at then rl_at = t end
end
if rl_at > now then return {'limit_delay', string.format('%.6f', rl_at - now), 'gate'} end
"""
        )
        commit = "rl_start_all(false)"
    else:
        check = (
            head
            + """
local rl_settled = false
for _ = 1, 8 do
  local moved = false
  for i = 0, rl_n - 1 do
    local t = rl_earliest_gated(rl_p[i], rl_at)
    if t == nil then return {'limit_busy', '1.000000', rl_p[i][6]} end
    if t > rl_at then rl_at = t; moved = true end
  end
  if not moved then rl_settled = true; break end
end
-- No time every limit allows within the search bound: reserve nothing, look again then.
if not rl_settled then return {'limit_busy', string.format('%.6f', rl_at - now)} end
if rl_at > now then
  for i = 0, rl_n - 1 do
    local p = rl_p[i]
    -- Concurrency places are taken by the copy when it runs (rl_start_all), not while
    -- the message is parked: this delivery's owner would never release one.
    if p[1] ~= 'concurrency' then rl_commit(p[1], p[2], p[3], p[4], p[5], rl_at, $owner) end
  end
  return {'limit_delay', string.format('%.6f', rl_at - now)}
end
"""
        )
        commit = "rl_start_all(true)"
    return Fragment(
        name=f"ratelimit x{count}{' reserved' if reserved else ''}",
        libraries=("ratelimit",),
        keys=tuple(f"{kind}{i}" for i in range(count) for kind in ("k", "o")),
        args=(
            "owner",
            *(
                f"{field}{i}"
                for i in range(count)
                for field in ("kind", "p1_", "p2_", "cost", "name")
            ),
        ),
        code=check,
        commit=commit,
    )


@cache
def release_fragment(count: int) -> Fragment:
    """The settle tail freeing the places ``count`` concurrency limits gave the owner."""
    return Fragment(
        name=f"concurrency x{count}",
        libraries=("ratelimit",),
        keys=tuple(f"k{i}" for i in range(count)),
        args=("owner",),
        code=f"for i = 1, {count} do rl_release(KEYS[@@ + i], $owner) end",
    )


def admission_args(
    store: Store,
    task_name: str,
    limits: Sequence[RateLimit],
    owner: str,
    tenant: str | None,
    arguments: Callable[[], dict[str, Any]],
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of :func:`fragment` for one delivery."""
    keys: list[str] = []
    args: list[Any] = [owner]
    for limit in limits:
        keys.extend(limit_keys(store, limit, limit.scope_value(task_name, tenant, arguments)))
        p1, p2 = limit.params
        args.extend([limit.kind, p1, p2, limit.cost, limit.name])
    return keys, args


class RateLimits(Guard):
    """The limits a task declares (names in settings or RateLimit objects): all must admit."""

    name = "rate_limits"
    verdicts = LimitVerdict
    options = {"rate_limits": "rate limits: names in settings or RateLimit objects, all must admit"}

    def check(self, task: str, values: Mapping[str, Any], signature: inspect.Signature) -> None:
        limits = values.get("rate_limits") or ()
        require(
            not isinstance(limits, str | RateLimit)
            and all(isinstance(x, str | RateLimit) for x in limits),
            task,
            "rate_limits must be a sequence of names or RateLimit objects",
        )

    def unresolved(self, options: Mapping[str, Any], rt: Runtime) -> list[Unresolved]:
        return [
            ("rate limit", name, sorted(rt.rate_limits))
            for name in options.get("rate_limits") or ()
            if isinstance(name, str) and name not in rt.rate_limits
        ]

    def part(self, call: Call) -> Part | None:
        limits = limits_of(call)
        if not limits:
            return None
        d = call.d
        keys, args = admission_args(
            call.rt.store, d.name, limits, d.owner, d.tenant_id, call.arguments
        )
        return Part(fragment(len(limits), d.reserved), keys, args)

    def admitted(self, call: Call, verdict: Verdict) -> None:
        for limit in limits_of(call):
            metrics.LIMIT_ADMITTED.labels(limit.name).inc()

    def refused(self, call: Call, verdict: Verdict) -> Action:
        # A copy keeps its reserved slot through the start gate and a full concurrency
        # limit; only a first delivery's "busy" reserved nothing.
        reserved = verdict.decision == LimitVerdict.DELAY or call.d.reserved
        delay = float(verdict.detail)
        if verdict.extra:
            metrics.LIMIT_LIMITED.labels(verdict.extra[0]).inc()
        log.info(
            "tokens_waiting",
            wait_seconds=round(delay, 3),
            reserved=reserved,
            limit=verdict.extra[0] if verdict.extra else None,
        )
        return Park(delay, verdict.decision, reserved=reserved)

    def settle(self, call: Call, ending: Ending) -> Part | None:
        places = [key for key, _ in concurrency_places(call)]
        return Part(release_fragment(len(places)), places, [call.d.owner]) if places else None

    def hold(self, call: Call, holding: Holding) -> None:
        holding.leases.extend(
            Lease(RENEW_PLACES, [key], ["", holding.owner, seconds], seconds)
            for key, seconds in concurrency_places(call)
        )


def limits_of(call: Call) -> list[RateLimit]:
    """The task's limits, names resolved against the runtime (once per task and runtime)."""
    rt = call.rt

    def resolve() -> list[RateLimit]:
        return [
            x if isinstance(x, RateLimit) else rt.rate_limit(x)
            for x in call.spec.option("rate_limits", ())
        ]

    found: list[RateLimit] = call.spec.cached(("rate_limits", id(rt)), resolve)
    return found


def concurrency_places(call: Call) -> list[tuple[str, float]]:
    """(key, lease seconds) of each concurrency limit this delivery takes a place in."""
    d = call.d
    return [
        (
            limit_keys(
                call.rt.store, limit, limit.scope_value(d.name, d.tenant_id, call.arguments)
            )[0],
            float(limit.lease_seconds),
        )
        for limit in limits_of(call)
        if limit.kind == "concurrency"
    ]
