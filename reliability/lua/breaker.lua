-- Circuit breaker shared by the fleet (semantics after resilience4j).
-- Keys per breaker: H (hash: state, mode, open_until, consec, half_ok, since, down_since:
-- when it last left closed, so a monitor can tell one open episode from the next),
-- W (window: a list for count windows, a hash of per-second buckets for time windows),
-- T (zset of half-open trial leases: owner -> expiry), E (stream of transitions).
-- cfg: threshold (consecutive failures, 0 = off), rate (failure-rate threshold 0..1,
-- 0 = off), kind ('count' | 'time'), window (calls or seconds), min_calls, slow_s
-- (0 = off), slow_rate, recovery (seconds open), half_max (trial calls), success_n.
-- Modes: normal, forced_open (rejects), disabled (admits, records nothing), shadow
-- (state machine runs and transitions are recorded, but nothing is ever rejected).

local function cb_cfg(a, i)
  return {threshold = tonumber(a[i]), rate = tonumber(a[i + 1]), kind = a[i + 2],
          window = tonumber(a[i + 3]), min_calls = tonumber(a[i + 4]),
          slow_s = tonumber(a[i + 5]), slow_rate = tonumber(a[i + 6]),
          recovery = tonumber(a[i + 7]), half_max = tonumber(a[i + 8]),
          success_n = tonumber(a[i + 9]), trial_lease = tonumber(a[i + 10])}
end
local CB_CFG_ARGS = 11

local function cb_transition(H, W, T, E, name, from, to, reason, mode, cfg)
  redis.call('HSET', H, 'state', to, 'since', string.format('%.6f', now))
  if to ~= 'closed' and (from == 'closed' or not redis.call('HGET', H, 'down_since')) then
    redis.call('HSET', H, 'down_since', string.format('%.6f', now))
  end
  if to == 'open' then
    redis.call('HSET', H, 'open_until', string.format('%.6f', now + cfg.recovery), 'half_ok', 0)
    redis.call('DEL', T)
  elseif to == 'half_open' then
    redis.call('HSET', H, 'half_ok', 0)
    redis.call('DEL', T)
  else
    redis.call('HSET', H, 'consec', 0, 'half_ok', 0)
    redis.call('DEL', W, W .. ':n', T)
  end
  redis.call('XADD', E, 'MAXLEN', '~', 10000, '*', 'breaker', name, 'from', from, 'to', to,
    'reason', reason, 'mode', mode, 'at', string.format('%.6f', now))
end

-- The state after time-based transitions (open -> half_open once recovery elapsed).
local function cb_state(H, W, T, E, name, cfg)
  local h = redis.call('HMGET', H, 'state', 'open_until', 'mode')
  local mode = h[3] or 'normal'
  local state = h[1] or 'closed'
  if state == 'open' and now >= tonumber(h[2] or '0') then
    cb_transition(H, W, T, E, name, 'open', 'half_open', 'recovery timeout elapsed', mode, cfg)
    state = 'half_open'
  end
  return state, mode, tonumber(h[2] or '0')
end

-- Admission: nil (admit), 'trial' (admit as a half-open trial, to commit), or a refusal
-- ('open', seconds until it may half-open) / ('busy', seconds until a trial slot frees).
local function cb_check(H, W, T, E, name, cfg)
  local state, mode, open_until = cb_state(H, W, T, E, name, cfg)
  if mode == 'disabled' then return nil end
  local verdict, wait = nil, 0
  if mode == 'forced_open' then
    verdict, wait = 'open', cfg.recovery
  elseif state == 'open' then
    verdict, wait = 'open', math.max(open_until - now, 0.001)
  elseif state == 'half_open' then
    redis.call('ZREMRANGEBYSCORE', T, '-inf', now)
    -- half_max trial calls per half-open spell, not in flight at once: a trial that
    -- succeeded keeps its place (a dead one frees it when its lease lapses, an ignored
    -- outcome at once). Never fewer than success_n, or the breaker could not close.
    local used = redis.call('ZCARD', T) + tonumber(redis.call('HGET', H, 'half_ok') or '0')
    if used < math.max(cfg.half_max, cfg.success_n) then
      verdict = 'trial'
    else
      local first = redis.call('ZRANGE', T, 0, 0, 'WITHSCORES')
      verdict, wait = 'busy', math.max(tonumber(first[2] or now) - now, 0.05)
    end
  end
  if mode == 'shadow' and verdict ~= 'trial' then return nil, 0, verdict end
  return verdict, wait, verdict
end

local function cb_take_trial(T, owner, cfg)
  redis.call('ZADD', T, now + cfg.trial_lease, owner)
end

local function cb_window(W, cfg, failed, slow)
  local calls, failures, slows = 0, 0, 0
  if cfg.kind == 'count' then
    -- The window's totals live beside it (W..':n') and change by the entry that enters
    -- and the one that leaves: O(1) per call, never a read of the whole window.
    local N = W .. ':n'
    local function account(entry, delta)
      redis.call('HINCRBY', N, 'c', delta)
      if string.sub(entry, 1, 1) == 'f' then redis.call('HINCRBY', N, 'f', delta) end
      if string.find(entry, 's', 2, true) then redis.call('HINCRBY', N, 's', delta) end
    end
    local entry = (failed and 'f' or 'o') .. (slow and 's' or '')
    redis.call('LPUSH', W, entry)
    account(entry, 1)
    while redis.call('LLEN', W) > cfg.window do account(redis.call('RPOP', W), -1) end
    local n = redis.call('HMGET', N, 'c', 'f', 's')
    calls, failures, slows = tonumber(n[1] or '0'), tonumber(n[2] or '0'), tonumber(n[3] or '0')
  else
    local bucket = math.floor(now)
    redis.call('HINCRBY', W, bucket .. ':c', 1)
    if failed then redis.call('HINCRBY', W, bucket .. ':f', 1) end
    if slow then redis.call('HINCRBY', W, bucket .. ':s', 1) end
    redis.call('EXPIRE', W, math.ceil(cfg.window) + 2)
    local flat = redis.call('HGETALL', W)
    for i = 1, #flat, 2 do
      local b, kind = string.match(flat[i], '^(%d+):(%a)$')
      if b and tonumber(b) > now - cfg.window then
        local n = tonumber(flat[i + 1])
        if kind == 'c' then calls = calls + n
        elseif kind == 'f' then failures = failures + n
        else slows = slows + n end
      elseif b then
        redis.call('HDEL', W, flat[i])
      end
    end
  end
  return calls, failures, slows
end

-- Record one call's outcome: 'success', 'failure' or 'ignore' (neither); duration in s.
local function cb_record(H, W, T, E, name, cfg, owner, outcome, duration)
  local state, mode = cb_state(H, W, T, E, name, cfg)
  if mode == 'disabled' then return state end
  local trial = redis.call('ZREM', T, owner) == 1
  if outcome == 'ignore' then return state end
  local failed = outcome == 'failure'
  local slow = cfg.slow_s > 0 and duration >= cfg.slow_s
  if state == 'half_open' then
    if not trial then return state end
    if failed then
      cb_transition(H, W, T, E, name, 'half_open', 'open', 'trial call failed', mode, cfg)
      return 'open'
    end
    if redis.call('HINCRBY', H, 'half_ok', 1) >= cfg.success_n then
      cb_transition(H, W, T, E, name, 'half_open', 'closed', 'trial calls succeeded', mode, cfg)
      return 'closed'
    end
    return state
  end
  if state ~= 'closed' then return state end
  local consec = 0
  if failed then consec = redis.call('HINCRBY', H, 'consec', 1)
  else redis.call('HSET', H, 'consec', 0) end
  local calls, failures, slows = cb_window(W, cfg, failed, slow)
  local reason = nil
  if cfg.threshold > 0 and consec >= cfg.threshold then
    reason = consec .. ' consecutive failures'
  elseif calls >= cfg.min_calls and calls > 0 then
    if cfg.rate > 0 and failures / calls >= cfg.rate then
      reason = string.format('failure rate %.2f over %d calls', failures / calls, calls)
    elseif cfg.slow_s > 0 and cfg.slow_rate > 0 and slows / calls >= cfg.slow_rate then
      reason = string.format('slow-call rate %.2f over %d calls', slows / calls, calls)
    end
  end
  if reason then
    cb_transition(H, W, T, E, name, 'closed', 'open', reason, mode, cfg)
    return 'open'
  end
  return state
end
