"""The fleet's Lua scripts, composed from one ``.lua`` file per concept.

Why Lua and not a library: every decision here (take a lease, settle a delivery, park
a message, claim due work) must read and write several keys atomically against the
one clock every process shares (Redis ``TIME``) in a single round trip. No Python
library offers these combined state machines; a script is the only way to keep them
atomic without locks. Each concept's functions live in ``reliability/lua/<noun>.lua``;
a script here is the prelude, the functions it uses and a short body.

Argument 1 of every script is ``now``: empty in production (Redis ``TIME``), a fixed
number in tests only.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def lua(name: str) -> str:
    """The source of ``reliability/lua/<name>.lua``."""
    return resources.files("reliability").joinpath(f"lua/{name}.lua").read_text()


def compose(*libraries: str, body: str) -> str:
    """The prelude, the named function libraries, then the body."""
    return "\n".join([lua("prelude"), *(lua(n) for n in libraries), body])


_COMPLETE_BODY = """
local outcome = 'succeeded'
if KEYS[1] ~= '' and idem_complete(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4],
                                   tonumber(ARGV[5])) == 0 then
  outcome = 'superseded'
end
delivery_finish(KEYS[3], outcome, tonumber(ARGV[6]))
if KEYS[5] ~= '' then budget_count_call(KEYS[5], tonumber(ARGV[11])) end
ledger_add(KEYS[4], ARGV[7], ARGV[8], ARGV[9], outcome, ARGV[10], '')
"""

# KEYS idem, leases, dlv, ledger, budget
# ARGV now, owner, fence, result, result_ttl_s, dlv_ttl_ms, maxlen, task_id, name,
#      attempt, budget_window_s
COMPLETE = compose(
    "idempotency", "delivery", "ledger", "budget", "breaker", "ratelimit", "guards",
    body=_COMPLETE_BODY + "guards_settle(6, 12)\nreturn outcome\n",
)

# Every settle script takes an optional tail of guards to settle (guards.lua): the
# breaker records the call's outcome, concurrency limits free their place.

# COMPLETE plus Celery's result write in the same round trip (see reliability.backend):
# KEYS + result meta key; ARGV + encoded meta, expiry seconds (0 = none). Like Celery's
# backend, an already stored SUCCESS is never overwritten; a superseded holder stores
# nothing.
COMPLETE_AND_STORE = compose(
    "idempotency", "delivery", "ledger", "budget", "breaker", "ratelimit", "guards",
    body=_COMPLETE_BODY + """
guards_settle(7, 14)
if outcome == 'succeeded' then
  local current = redis.call('GET', KEYS[6])
  local ok, meta = pcall(cjson.decode, current or '{}')
  if not (ok and type(meta) == 'table' and meta['status'] == 'SUCCESS') then
    if tonumber(ARGV[13]) > 0 then
      redis.call('SETEX', KEYS[6], ARGV[13], ARGV[12])
    else
      redis.call('SET', KEYS[6], ARGV[12])
    end
    redis.call('PUBLISH', KEYS[6], ARGV[12])
  end
end
return outcome
""",
)

# KEYS idem, leases, dlv, ledger, budget, parked, parked_msgs
# ARGV now, owner, fence, mode(retry|defer), budget_window_s, budget_ratio,
#      budget_min_retries_per_s, park_id, delay_s, envelope, dlv_ttl_ms, maxlen, task_id, name,
#      attempt, outcome, detail
PARK = compose(
    "idempotency", "delivery", "deferral", "ledger", "budget", "breaker", "ratelimit", "guards",
    body="""
guards_settle(8, 18)
if ARGV[4] == 'retry' and KEYS[5] ~= '' then
  local window = tonumber(ARGV[5])
  budget_count_call(KEYS[5], window)
  if budget_allow_retry(KEYS[5], window, tonumber(ARGV[6]), tonumber(ARGV[7])) == 0 then
    return {'refused', ''}
  end
end
if KEYS[1] ~= '' then idem_release(KEYS[1], KEYS[2], ARGV[2], ARGV[3]) end
local due = now + tonumber(ARGV[9])
park(KEYS[6], KEYS[7], ARGV[8], due, ARGV[10])
delivery_finish(KEYS[3], ARGV[16], tonumber(ARGV[11]))
ledger_add(KEYS[4], ARGV[12], ARGV[13], ARGV[14], ARGV[16], ARGV[15], ARGV[17])
return {'parked', string.format('%.6f', due)}
""",
)

# KEYS idem, leases, dlv, ledger, budget, dlq, dlq_index
# ARGV now, owner, fence, budget_window_s, dlq_id, envelope, dlq_max, dlv_ttl_ms,
#      maxlen, task_id, name, attempt, failure_class
DEAD_LETTER = compose(
    "idempotency", "delivery", "dlq", "ledger", "budget", "breaker", "ratelimit", "guards",
    body="""
guards_settle(8, 14)
if KEYS[1] ~= '' and ARGV[2] ~= '' then idem_release(KEYS[1], KEYS[2], ARGV[2], ARGV[3]) end
if KEYS[5] ~= '' then budget_count_call(KEYS[5], tonumber(ARGV[4])) end
local evicted = dlq_add(KEYS[6], KEYS[7], ARGV[5], ARGV[6], ARGV[7])
delivery_finish(KEYS[3], 'dead_lettered', tonumber(ARGV[8]))
ledger_add(KEYS[4], ARGV[9], ARGV[10], ARGV[11], 'dead_lettered', ARGV[12], ARGV[13])
return evicted
""",
)

# KEYS ledger   ARGV now, maxlen, task_id, name, outcome, attempt, detail
RECORD = compose(
    "ledger",
    body="ledger_add(KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])\nreturn 1",
)

# KEYS idem, leases   ARGV now, owner, fence ('' = any fence of this owner)
RELEASE = compose(
    "idempotency", body="return idem_release(KEYS[1], KEYS[2], ARGV[2], ARGV[3])"
)

# KEYS idem, leases   ARGV now, owner, fence, lease_s
RENEW = compose(
    "idempotency",
    body="return idem_renew(KEYS[1], KEYS[2], ARGV[2], ARGV[3], tonumber(ARGV[4]))",
)

# KEYS parked, parked_msgs   ARGV now, limit, claim_s
CLAIM_PARKED = compose(
    "deferral",
    body="return parked_claim(KEYS[1], KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]))",
)

# KEYS leases   ARGV now, limit
# Lapsed leases still marked running: removed from the index and returned as
# (key, delivery tag) pairs for the reaper to restore.
REAP_LEASES = compose(
    body="""
local out = {}
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, key in ipairs(keys) do
  local h = redis.call('HMGET', key, 'state', 'until', 'dtag')
  redis.call('ZREM', KEYS[1], key)
  if h[1] == 'running' and tonumber(h[2] or '0') <= now then
    out[#out + 1] = key
    out[#out + 1] = h[3] or ''
  end
end
return out
""",
)

# KEYS/ARGV: a guards tail only (guards.lua), after ARGV[1] = now.
SETTLE_GUARDS = compose("breaker", "ratelimit", "guards", body="guards_settle(1, 2)\nreturn 1")
