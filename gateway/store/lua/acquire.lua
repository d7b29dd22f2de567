-- Take (or beat again) a gateway's lease on an open batch: the commit fence's entry half.
-- ARGV[4] lease token. Returns {state, 1 if the lease is held}.
-- A committing batch grants no new lease: reading the state and taking the lease in one script
-- is what makes a concurrent commit, which first seals the batch, see every lease taken before.
local state = current()
if state == 'open' then
  redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
  keep(KEYS[2])
  return {state, 1}
end
return {state, redis.call('HEXISTS', KEYS[2], ARGV[4])}
