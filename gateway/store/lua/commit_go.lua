-- May this commit attempt go to the server? Only when no gateway lease is live; then the attempt
-- is marked sent, atomically with the check, and the record lives as long as a committed one.
-- ARGV[4] attempt id, ARGV[5] attempt time to live in ms, ARGV[6] channel, ARGV[7] bid,
-- ARGV[8] '1' to adopt a batch with no record (as begin_commit; sent right behind it, pipelined).
-- Returns 1 (go) or 0 (wait: leases are live, or the attempt lapsed and the batch was sealed anew).
local state = current()
if state == 'committed' or state == 'fired' then return 1 end
if state == 'unknown' and ARGV[8] ~= '1' then return 0 end
local ttl = tonumber(ARGV[5])
if state ~= 'committing' then
  seal(ARGV[4], ttl, ARGV[6], ARGV[7])
  return 0
end
if redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf') > 0 then
  attempt_until('w:' .. ARGV[4], ttl)
  return 0
end
redis.call('ZREM', KEYS[3], 'w:' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
attempt_until('s:' .. ARGV[4], ttl)
return 1
