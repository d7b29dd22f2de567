-- The batch's callback job of one kind was ACKed: its stage moves from '1' to '2' (from no other);
-- its claim ends (the ACK proves the server had the job: nobody may push it again); then evaluate.
-- ARGV[6] kind, ARGV[7] the token of any claim this makes. Returns the claims made.
if current() == 'unknown' then return {} end
local kind = ARGV[6]
if redis.call('HGET', KEYS[4], 'st:' .. kind) == '1' then
  redis.call('HSET', KEYS[4], 'st:' .. kind, '2')
  redis.call('HDEL', KEYS[4], 'claim:' .. kind)
  note_change({})
end
return evaluate(ARGV[7])
