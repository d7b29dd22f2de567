-- Take or extend this gateway's lease on an open batch: the commit fence's entry half.
-- ARGV[4] gateway id, ARGV[5] lease time to live in ms. Returns {state, 1 if the lease is live}.
-- A committing batch grants no new lease: reading the state and taking the lease in one script
-- is what makes a concurrent commit, which first seals the batch, see every lease taken before.
local state = current()
if state == 'open' then
  extend_lease(ARGV[4], tonumber(ARGV[5]))
  return {state, 1}
end
return {state, lease_live(ARGV[4]) and 1 or 0}
