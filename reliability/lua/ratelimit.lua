-- Fleet-wide rate limits on Redis time. Each limit: kind, key K, an override hash O
-- (set_rate at runtime), and parameters p1, p2 plus cost:
--   gcra        rate per second (p1), burst (p2): the token bucket as GCRA, K holds the TAT
--   sliding     max requests (p1) per window seconds (p2): K is a zset log of admissions
--   fixed       max requests (p1) per window seconds (p2): K is a counter prefix
--   concurrency max holders (p1), holder lease seconds (p2): K is a zset owner -> expiry
-- rl_earliest gives the earliest time >= t at which the request conforms (nil: a
-- concurrency limit is full, no reservation possible); rl_commit reserves it at t.

local function rl_params(O, p1, p2)
  local o = redis.call('HMGET', O, 'p1', 'p2')
  return tonumber(o[1] or p1), tonumber(o[2] or p2)
end

-- The score of the entry at a rank (0-based; -1 the newest): O(log n), never the whole log.
local function rl_score_at(K, rank)
  return tonumber(redis.call('ZRANGE', K, rank, rank, 'WITHSCORES')[2])
end

local function rl_earliest(kind, K, p1, p2, cost, t)
  if kind == 'gcra' then
    local interval = 1 / p1
    local tat = tonumber(redis.call('GET', K) or '0')
    return math.max(t, math.max(tat, t) + interval * cost - interval * p2)
  elseif kind == 'sliding' then
    if cost > p1 then return nil end  -- can never fit: refused like the other kinds
    redis.call('ZREMRANGEBYSCORE', K, '-inf', now - p2)
    local k = redis.call('ZCARD', K)
    if k + cost <= p1 then return t end
    -- The entry `cost` places before the (p1)-th newest bounds the next slot.
    local bound = rl_score_at(K, k - p1 + cost - 1)
    return math.max(t, bound + p2, rl_score_at(K, -1))
  elseif kind == 'fixed' then
    local window = math.floor(t / p2)
    for _ = 1, 1000 do
      local used = tonumber(redis.call('GET', K .. ':' .. window) or '0')
      if used + cost <= p1 then return math.max(t, window * p2) end
      window = window + 1
    end
    return nil
  else
    redis.call('ZREMRANGEBYSCORE', K, '-inf', now)
    if redis.call('ZCARD', K) + cost <= p1 then return t end
    return nil
  end
end

local function rl_commit(kind, K, p1, p2, cost, t, owner)
  if kind == 'gcra' then
    local interval = 1 / p1
    local tat = math.max(tonumber(redis.call('GET', K) or '0'), t) + interval * cost
    redis.call('SET', K, string.format('%.6f', tat), 'PX', math.ceil((tat - now + 1) * 1000))
  elseif kind == 'sliding' then
    for i = 1, cost do
      redis.call('ZADD', K, t, string.format('%.6f:%s:%d', t, owner, i))
    end
    redis.call('PEXPIRE', K, math.ceil((t - now + p2 + 1) * 1000))
  elseif kind == 'fixed' then
    local wk = K .. ':' .. math.floor(t / p2)
    redis.call('INCRBY', wk, cost)
    redis.call('PEXPIRE', wk, math.ceil((t - now + p2 + 1) * 1000))
  else
    -- One member per place taken: owner, owner#2 .. owner#cost (rl_release frees them all).
    redis.call('ZADD', K, now + p2, owner)
    for i = 2, cost do redis.call('ZADD', K, now + p2, owner .. '#' .. i) end
    redis.call('PEXPIRE', K, math.ceil((p2 + 1) * 1000))
  end
end

-- Free the concurrency places a holder took (see rl_commit); returns how many.
local function rl_release(K, owner)
  local n = 0
  while redis.call('ZREM', K, n == 0 and owner or owner .. '#' .. (n + 1)) == 1 do n = n + 1 end
  return n
end

-- Tokens (gcra) or free places (others) available right now, for reporting.
local function rl_available(kind, K, p1, p2)
  if kind == 'gcra' then
    local tat = math.max(tonumber(redis.call('GET', K) or '0'), now)
    return math.max(0, p2 - (tat - now) * p1)
  elseif kind == 'sliding' then
    redis.call('ZREMRANGEBYSCORE', K, '-inf', now - p2)
    return math.max(0, p1 - redis.call('ZCOUNT', K, '-inf', now))
  elseif kind == 'fixed' then
    return math.max(0, p1 - tonumber(redis.call('GET', K .. ':' .. math.floor(now / p2)) or '0'))
  end
  redis.call('ZREMRANGEBYSCORE', K, '-inf', now)
  return math.max(0, p1 - redis.call('ZCARD', K))
end

-- The start gate: reservations spread admissions over time, but a reserved copy starts
-- when it is redelivered, which can be late. Starts are also logged (K..':starts') and
-- nothing starts while the log holds the limit's most within the gate window, so the
-- admissions actually made never exceed the limit in any window, late copies included;
-- the window gives late copies slack (a second GCRA with burst 1 would not). The log
-- holds only the starts of the last window. A fixed window gated so behaves as a
-- sliding one: never twice its max across a window boundary.
local function rl_gate(kind, p1, p2)
  if kind == 'gcra' then
    -- GCRA's most in any window (t - gw, t]: burst, then one per 1/p1 while inside it,
    -- i.e. p2 + ceil(p1 * gw) - 1 (floor would cap a fractional rate such as 2.5/s at 2/s).
    local gw = math.max(1, 1 / p1)
    return gw, math.max(1, math.ceil(p1 * gw - 1e-9) + p2 - 1)
  end
  return p2, p1
end

local function rl_gate_free(kind, K, p1, p2, cost, t)
  local gw, most = rl_gate(kind, p1, p2)
  local S = K .. ':starts'
  redis.call('ZREMRANGEBYSCORE', S, '-inf', now - gw)
  local k = redis.call('ZCARD', S)
  if k + cost <= most then return t end
  return math.max(t, rl_score_at(S, k - most + cost - 1) + gw)
end

local function rl_start(kind, K, p1, p2, cost, owner)
  local gw = rl_gate(kind, p1, p2)
  local S = K .. ':starts'
  for i = 1, cost do
    redis.call('ZADD', S, now, string.format('%.6f:%s:%d', now, owner, i))
  end
  redis.call('PEXPIRE', S, math.ceil((gw + 1) * 1000))
end
