-- Retry budget: calls and retries per fixed window, read as a sliding estimate over
-- the current and previous window. A retry is allowed while retries stay within
-- max(min_retries, ratio * calls).
local function budget_incr(key, window)
  if redis.call('INCR', key) == 1 then redis.call('EXPIRE', key, window * 2 + 1) end
end

local function budget_count_call(base, window)
  budget_incr(base .. ':c:' .. math.floor(now / window), window)
end

local function budget_allow_retry(base, window, ratio, min_retries)
  local idx = math.floor(now / window)
  local weight = 1 - (now - idx * window) / window
  local function est(kind)
    local cur = tonumber(redis.call('GET', base .. kind .. idx) or '0')
    local prev = tonumber(redis.call('GET', base .. kind .. (idx - 1)) or '0')
    return cur + prev * weight
  end
  if est(':r:') + 1 > math.max(min_retries, ratio * est(':c:')) then return 0 end
  budget_incr(base .. ':r:' .. idx, window)
  return 1
end
