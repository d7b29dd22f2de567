-- Take over a claim whose holder looks dead: only if it is still held by the token the watcher saw.
-- ARGV[6] kind, ARGV[7] the token seen, ARGV[8] the new token.
-- Returns the callback job to push again, or nil (confirmed, ACKed, or taken over already).
local claim = 'claim:' .. ARGV[6]
if redis.call('HGET', KEYS[4], claim) ~= ARGV[7] then return false end
redis.call('HSET', KEYS[4], claim, ARGV[8])
return redis.call('HGET', KEYS[4], 'cb:' .. ARGV[6])
