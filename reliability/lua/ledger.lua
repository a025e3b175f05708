-- The outcome ledger: one stream entry per delivery outcome, capped by MAXLEN.
local function ledger_add(stream, maxlen, task_id, name, outcome, attempt, detail)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
    'task_id', task_id, 'task', name, 'outcome', outcome, 'attempt', attempt,
    'detail', detail or '', 'at', string.format('%.6f', now))
end
