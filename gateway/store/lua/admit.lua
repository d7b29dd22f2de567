-- Admit one command that adds to a batch: the commit fence's entry half.
-- KEYS[1]  the batch's state key
-- KEYS[2]  the batch's lease set (sorted set: token -> expiry in server milliseconds)
-- ARGV[1]  the lease token
-- ARGV[2]  the lease's time to live, in milliseconds
-- Returns 'open' when admitted (the lease is held), otherwise the state that refuses it.
-- Reading the state and taking the lease in one script is what makes a concurrent
-- BATCH COMMIT, which first moves the state to 'committing', see every lease taken before it.
local state = redis.call('GET', KEYS[1])
if not state then return 'unknown' end
if state ~= 'open' then return state end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return 'open'
