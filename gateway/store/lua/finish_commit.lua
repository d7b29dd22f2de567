-- The server answered a commit attempt, or the attempt gave up (fence timeout).
-- ARGV[4] attempt id, ARGV[5] '1' when the server said +OK.
-- +OK always means committed, whatever other attempts or timeouts did (the ledger follows the
-- server). Otherwise the attempt is withdrawn, and the batch reopens only if no other remains.
local state = current()
if state == 'fired' then return state end
if ARGV[5] == '1' then
  set_state('committed')
  return 'committed'
end
redis.call('HDEL', KEYS[3], 'w:' .. ARGV[4], 's:' .. ARGV[4])
if state == 'committing' and redis.call('HLEN', KEYS[3]) == 0 then
  set_state('open')
  return 'open'
end
return state
