-- The server took a callback job (+OK): its claim ends, if this token still holds it (a claim
-- taken over since is its new holder's). ARGV[6] kind, ARGV[7] token.
local claim = 'claim:' .. ARGV[6]
if redis.call('HGET', KEYS[4], claim) == ARGV[7] then redis.call('HDEL', KEYS[4], claim) end
return 0
