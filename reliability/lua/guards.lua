-- Settle the guards of a call that ran: each breaker records the outcome and frees its
-- trial slot; each concurrency limit frees its place. A script passes the tail of its
-- KEYS/ARGV from k / a: ARGV owner, nb, [name, outcome, duration, cfg x11] x nb, nc;
-- KEYS [H, W, T, E] x nb, [K] x nc. No tail (ARGV[a] absent): nothing to settle.
local function guards_settle(k, a)
  if ARGV[a] == nil or ARGV[a] == '' then return end
  local owner = ARGV[a]
  local nb = tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, nb do
    cb_record(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[a], cb_cfg(ARGV, a + 3),
      owner, ARGV[a + 1], tonumber(ARGV[a + 2]))
    k = k + 4
    a = a + 3 + CB_CFG_ARGS
  end
  for i = 0, tonumber(ARGV[a]) - 1 do rl_release(KEYS[k + i], owner) end
end
