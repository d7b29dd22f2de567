-- Resolve a commit whose gateway died: a gateway saw every attempt's beat unchanged for longer
-- than a live committer ever leaves it. ARGV[4..] the attempts it saw, as id, beat pairs.
-- Only if the attempts are still exactly those: a sent one may have reached the server, so the
-- batch reads committed (the safe side); none sent, the server cannot have it: open again.
-- Returns the state after.
local state = current()
if state ~= 'committing' then return state end
local attempts = redis.call('HGETALL', KEYS[3])
if #attempts ~= #ARGV - 3 then return state end
local seen = {}
for i = 4, #ARGV, 2 do seen[ARGV[i]] = ARGV[i + 1] end
local sent = false
for i = 1, #attempts, 2 do
  if seen[attempts[i]] ~= attempts[i + 1] then return state end
  if string.sub(attempts[i], 1, 2) == 's:' then sent = true end
end
if sent then
  set_state('committed')
  return 'committed'
end
set_state('open')
return 'open'
