-- May this commit attempt go to the server? Only when no gateway lease is left in the ledger.
-- ARGV[4] attempt id, ARGV[5] channel, ARGV[6] bid, ARGV[7] '1' to adopt a batch with no record,
-- ARGV[8..] the leases the committer saw unchanged for a whole lease life on its own clock, as
-- token, beat pairs: each still at that beat is ended here (its gateway has stopped writing, and
-- what it wrote has been handled: docs/fence.md). A lease beaten since is not.
-- Returns {1} (go: the attempt is marked sent) or {0, token, beat, ...} (wait for these leases).
local state = current()
if state == 'committed' or state == 'fired' then return {1} end
if state == 'unknown' and ARGV[7] ~= '1' then return {0} end
if state ~= 'committing' then
  -- This attempt was abandoned (its beat looked dead to some gateway) and the batch reopened:
  -- seal it again and wait for the leases taken meanwhile.
  seal(ARGV[4], ARGV[5], ARGV[6])
  return {0}
end
local lapsed = {}
for i = 8, #ARGV, 2 do lapsed[ARGV[i]] = ARGV[i + 1] end
local live = {0}
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  if lapsed[leases[i]] == leases[i + 1] then
    redis.call('HDEL', KEYS[2], leases[i])
  else
    live[#live + 1] = leases[i]
    live[#live + 1] = leases[i + 1]
  end
end
if #live > 1 then
  redis.call('HINCRBY', KEYS[3], 'w:' .. ARGV[4], 1)
  keep(KEYS[3])
  return live
end
-- From here the server may have it committed: the record lives as long as a committed one.
redis.call('HDEL', KEYS[3], 'w:' .. ARGV[4])
redis.call('HINCRBY', KEYS[3], 's:' .. ARGV[4], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
expire_with_state(KEYS, ARGV[2])
keep(KEYS[3])
return {1}
