-- Count the leases of a batch that are neither released nor expired (by the server's clock).
-- KEYS[1]  the batch's lease set
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
