-- Parked messages: a zset by due time plus a hash of envelopes. Parking issues a defer
-- id (its key holds '' until a copy claims it); a published copy carries the defer id and
-- a publish id; the first copy admitted owns the defer id, a redelivery of that same copy
-- still runs, any other copy is a duplicate. A defer id nobody issued (a producer forging
-- our internal headers, e.g. to pass a rate limit as a "reserved" copy) is 'unknown'.
local function defer_issue(key, ttl_ms)
  redis.call('SET', key, '', 'PX', ttl_ms)
end

local function defer_claim(key, pub, ttl_ms)
  local owner = redis.call('GET', key)
  if not owner then return 'unknown', '' end
  if owner ~= '' and owner ~= pub then return 'duplicate', owner end
  if owner == '' then redis.call('SET', key, pub, 'PX', ttl_ms) end
  return nil
end

local function park(zset, hash, id, due, envelope)
  redis.call('HSET', hash, id, envelope)
  redis.call('ZADD', zset, due, id)
end

-- Due entries are claimed (pushed claim_s into the future) before publishing, so a
-- mover that dies after publishing hands them over instead of losing them.
local function parked_claim(zset, hash, limit, claim_s)
  local ids = redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', 0, limit)
  local out = {}
  for _, id in ipairs(ids) do
    local envelope = redis.call('HGET', hash, id)
    if envelope then
      redis.call('ZADD', zset, now + claim_s, id)
      out[#out + 1] = id
      out[#out + 1] = envelope
    else
      redis.call('ZREM', zset, id)
    end
  end
  return out
end
