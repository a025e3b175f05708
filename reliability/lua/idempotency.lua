-- Idempotency state of one key (a hash):
--   state  running | done | released     fp     fingerprint of the arguments
--   owner  the delivery holding the lease  until  lease expiry (Redis time)
--   fence  increases on every acquisition  result JSON result once done
-- A running key whose lease lapsed is free to take over; its fence moves on, so the
-- paused holder can neither renew, complete nor release any more.
local function idem_check(key, fp)
  local h = redis.call('HMGET', key, 'state', 'fp', 'until', 'result')
  local state = h[1]
  if state == 'done' then
    if h[2] ~= fp then return 'conflict', 'done' end
    return 'done', h[4]
  end
  if state == 'running' and tonumber(h[3] or '0') > now then
    if h[2] ~= fp then return 'conflict', 'running' end
    return 'busy', string.format('%.6f', tonumber(h[3]) - now)
  end
  return nil
end

local function idem_acquire(key, leases, fp, owner, lease_s, ttl_s, task_id, dtag)
  local fence = redis.call('HINCRBY', key, 'fence', 1)
  local expiry = now + lease_s
  redis.call('HSET', key, 'state', 'running', 'fp', fp, 'owner', owner,
    'until', string.format('%.6f', expiry), 'tid', task_id, 'dtag', dtag)
  redis.call('EXPIRE', key, ttl_s)
  redis.call('ZADD', leases, expiry, key)
  return fence
end

local function idem_holds(key, owner, fence)
  local h = redis.call('HMGET', key, 'owner', 'fence', 'state')
  return h[3] == 'running' and h[1] == owner and (fence == '' or h[2] == fence)
end

local function idem_complete(key, leases, owner, fence, result, ttl_s)
  if not idem_holds(key, owner, fence) then return 0 end
  redis.call('HSET', key, 'state', 'done', 'result', result)
  redis.call('HDEL', key, 'owner', 'until', 'dtag')
  redis.call('EXPIRE', key, ttl_s)
  redis.call('ZREM', leases, key)
  return 1
end

local function idem_release(key, leases, owner, fence)
  if not idem_holds(key, owner, fence) then return 0 end
  redis.call('HSET', key, 'state', 'released')
  redis.call('HDEL', key, 'owner', 'until', 'dtag')
  redis.call('ZREM', leases, key)
  return 1
end

local function idem_renew(key, leases, owner, fence, lease_s)
  if not idem_holds(key, owner, fence) then return 0 end
  local expiry = now + lease_s
  redis.call('HSET', key, 'until', string.format('%.6f', expiry))
  redis.call('ZADD', leases, expiry, key)
  return 1
end
