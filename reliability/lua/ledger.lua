-- The outcome ledger: one stream entry per delivery outcome, capped by MAXLEN.
-- `duration` (seconds the body ran) only when the body ran: the report's run times.
local function ledger_add(stream, maxlen, task_id, name, outcome, attempt, detail, duration)
  if duration and duration ~= '' then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
      'task_id', task_id, 'task', name, 'outcome', outcome, 'attempt', attempt,
      'detail', detail or '', 'at', string.format('%.6f', now), 'duration', duration)
    return
  end
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
    'task_id', task_id, 'task', name, 'outcome', outcome, 'attempt', attempt,
    'detail', detail or '', 'at', string.format('%.6f', now))
end
