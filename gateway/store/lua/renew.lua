-- Extend this gateway's lease if, and only if, it is still live, in any state: a commit waits for
-- it. A lapsed lease is never revived; the gateway then aborts what it admitted under it.
-- ARGV[4] gateway id, ARGV[5] lease time to live in ms. Returns {state, 1 if renewed}.
local state = current()
if lease_live(ARGV[4]) then
  extend_lease(ARGV[4], tonumber(ARGV[5]))
  return {state, 1}
end
redis.call('ZREM', KEYS[2], ARGV[4])
return {state, 0}
