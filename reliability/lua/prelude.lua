-- Every script starts here. Redis < 7 needs effects replication before it may write
-- after a non-deterministic command (TIME); Redis 7 replicates effects anyway.
-- The clock is Redis TIME; ARGV[1] may carry a fixed `now` for tests only.
redis.replicate_commands()
local now
if ARGV[1] ~= nil and ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
