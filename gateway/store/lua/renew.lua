-- Beat a lease if, and only if, it is still in the ledger, in any state: a commit waits for it.
-- A lease a committer ended (it saw the beat unchanged for a whole lease life) is never revived;
-- the gateway then resets what it admitted under it (it is past its local deadline anyway).
-- ARGV[4] lease token. Returns {state, 1 if renewed}.
local state = current()
if redis.call('HEXISTS', KEYS[2], ARGV[4]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
  keep(KEYS[2])
  return {state, 1}
end
return {state, 0}
