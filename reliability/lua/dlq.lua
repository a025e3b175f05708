-- The dead-letter queue: a hash of envelopes plus a zset by failure time. Bounded by
-- policy: beyond `max` entries the oldest are evicted and the count is returned.
local function dlq_add(hash, index, id, envelope, max)
  redis.call('HSET', hash, id, envelope)
  redis.call('ZADD', index, now, id)
  local over = redis.call('ZCARD', index) - tonumber(max)
  if over > 0 then
    local old = redis.call('ZRANGE', index, 0, over - 1)
    for _, oid in ipairs(old) do redis.call('HDEL', hash, oid) end
    redis.call('ZREMRANGEBYRANK', index, 0, over - 1)
    return over
  end
  return 0
end
