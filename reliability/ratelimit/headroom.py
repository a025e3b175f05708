"""Headroom: how many calls a set of limits admits right now, read without taking any.

Work that the service itself decides to start (the DLQ reprocessor redriving entries)
asks first how much the limits its task declares would admit *now*, and starts no more
than that: the started tasks then take their tokens at admission as usual, instead of
being parked by the limiter, and nothing is reserved for work that may not start. The
script only reads (no trimming, no reservation), so a dry run changes nothing.

Per limit it counts what :mod:`ratelimit.lua <reliability.scripts>` counts at
admission — GCRA tokens (reservations ahead included), the sliding log and the fixed
window (reservations ahead included), a concurrency limit's live holders — and the start
gate, then divides by the limit's cost; the headroom of the set is the least of these.
"""

from __future__ import annotations

from collections.abc import Sequence

from reliability import scripts
from reliability.ratelimit.limit import RateLimit, limit_keys
from reliability.store import Store

# KEYS per limit: K, O   ARGV now, then per limit: kind, p1, p2, cost
_HEADROOM = scripts.compose(
    "ratelimit",
    body="""
local least = -1
for i = 0, #KEYS / 2 - 1 do
  local K, O = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local kind, cost = ARGV[4 * i + 2], tonumber(ARGV[4 * i + 5])
  local p1, p2 = rl_params(O, ARGV[4 * i + 3], ARGV[4 * i + 4])
  local free
  if kind == 'gcra' then
    local tat = math.max(tonumber(redis.call('GET', K) or '0'), now)
    free = p2 - (tat - now) * p1
  elseif kind == 'sliding' then
    free = p1 - redis.call('ZCOUNT', K, '(' .. (now - p2), '+inf')
  elseif kind == 'fixed' then
    free = p1 - tonumber(redis.call('GET', K .. ':' .. math.floor(now / p2)) or '0')
  else
    free = p1 - redis.call('ZCOUNT', K, '(' .. now, '+inf')
  end
  if kind ~= 'concurrency' then
    local gw, most = rl_gate(kind, p1, p2)
    local started = redis.call('ZCOUNT', K .. ':starts', '(' .. (now - gw), '+inf')
    free = math.min(free, most - started)
  end
  local fit = math.max(0, math.floor(free / cost + 1e-9))
  if least < 0 or fit < least then least = fit end
end
return least
""",
)


def headroom(
    store: Store, limits: Sequence[tuple[RateLimit, str]], now: float | None = None
) -> int | None:
    """Calls every limit in ``limits`` (each at its scope value) admits now without
    delay; None when there are no limits (unlimited). Reads only."""
    if not limits:
        return None
    keys: list[str] = []
    args: list[object] = ["" if now is None else now]
    for limit, scope in limits:
        keys.extend(limit_keys(store, limit, scope))
        p1, p2 = limit.params
        args.extend([limit.kind, p1, p2, limit.cost])
    return int(store.run(_HEADROOM, keys, args, "rate limit headroom"))
