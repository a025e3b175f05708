-- Degradation levels. One hash per deployment, P:degradation: `level` (what the fleet
-- applies), `computed` (the rules' level), `reason`, `since`, and an operator's override
-- (`override_level`, `override_reason`, `override_expires`, `override_by`). The level
-- in force is an unexpired override, else `level`; once an override has expired, the
-- rules' `computed` level (until the next evaluation rewrites `level`). Redis time.
-- Anything but the five names reads as NORMAL: a stray value never stops work.
local DEG_RANK = {NORMAL = 0, MINOR = 1, MODERATE = 2, SEVERE = 3, CRITICAL = 4}

local function deg_name(value)
  local level = string.upper(value or 'NORMAL')
  if DEG_RANK[level] == nil then return 'NORMAL' end
  return level
end

local function deg_level(key)
  local h = redis.call('HMGET', key, 'level', 'computed', 'override_level', 'override_expires')
  if h[3] and h[3] ~= '' then
    if (tonumber(h[4] or '') or 0) > now then return deg_name(h[3]) end
    return deg_name(h[2])
  end
  return deg_name(h[1])
end
