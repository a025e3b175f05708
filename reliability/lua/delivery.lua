-- One message delivery (task id, attempt, published copy): how often the broker
-- delivered it, and whether an earlier delivery already settled it.
local function delivery_admit(key, max_redeliveries, ttl_ms)
  local n = redis.call('HINCRBY', key, 'n', 1)
  redis.call('PEXPIRE', key, ttl_ms)
  local fin = redis.call('HGET', key, 'fin')
  if fin then return 'finished', fin end
  if n > max_redeliveries then return 'poison', tostring(n) end
  return nil
end

local function delivery_finish(key, outcome, ttl_ms)
  if key == nil or key == '' then return end
  redis.call('HSET', key, 'fin', outcome)
  redis.call('PEXPIRE', key, ttl_ms)
end
