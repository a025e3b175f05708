-- Retry budget, after Finagle's RetryBudget: in any window of `window` seconds the fleet
-- may retry  per_second * window  times (a floor for quiet or just-started traffic) plus
-- `ratio` of the calls made in that window. A call is every attempt that ended (success,
-- failure, dead letter), retries included, so a failure rate up to `ratio` is retried in
-- full and a storm adds at most ratio / (1 - ratio) of the calls, plus the floor.
-- Calls and retries are counted per fixed window and read as a sliding estimate: the
-- current window plus the previous one weighted by the share of it still inside the last
-- `window` seconds.

-- Allowance comparisons tolerate float rounding (0.2 * 375 is not exactly 75).
local BUDGET_EPSILON = 1e-9

local function budget_incr(key, window)
  if redis.call('INCR', key) == 1 then redis.call('EXPIRE', key, math.ceil(window * 2) + 1) end
end

local function budget_count_call(base, window)
  budget_incr(base .. ':c:' .. math.floor(now / window), window)
end

-- 1 and the retry counted when allowed, 0 (nothing written) when refused.
local function budget_allow_retry(base, window, ratio, per_second)
  local idx = math.floor(now / window)
  local weight = 1 - (now - idx * window) / window
  local function est(kind)
    local cur = tonumber(redis.call('GET', base .. kind .. idx) or '0')
    local prev = tonumber(redis.call('GET', base .. kind .. (idx - 1)) or '0')
    return cur + prev * weight
  end
  local allowance = per_second * window + ratio * est(':c:')
  if est(':r:') + 1 > allowance + BUDGET_EPSILON then return 0 end
  budget_incr(base .. ':r:' .. idx, window)
  return 1
end
