-- Create a batch, open, with its meta, if it has no record.
-- ARGV[6] parent bid ('' for a root), ARGV[7] description, ARGV[8] created_at,
-- ARGV[9..] its callbacks as kind, job JSON pairs.
-- A child is counted in its parent's children in the same step. The caller admitted it under the
-- parent's lease (open), or let a worker holding a job of the committed parent add it (mode
-- member-reopen: that job keeps the parent from completing); a parent with no record, being
-- committed or fired refuses the child, and nothing is created. Returns 'open' when created, else the state that stopped it: the batch's
-- own (it exists: a retried BATCH NEW changes nothing) or the parent's (refused).
local before = current()
if before ~= 'unknown' then return before end
local parent = ARGV[6]
if parent ~= '' then
  local parent_keys = keys_of(parent)
  local parent_state = redis.call('GET', parent_keys[1]) or 'unknown'
  if parent_state ~= 'open' and parent_state ~= 'committed' then return parent_state end
  redis.call('HINCRBY', parent_keys[4], 'children', 1)
  expire_with_record(parent_keys)
end
local meta = {
  'parent', parent, 'description', ARGV[7], 'created_at', ARGV[8],
  'total', 0, 'ran', 0, 'acked', 0, 'failing', 0, 'children', 0, 'progress', 0,
  'st:complete', '', 'st:success', '', 'over:complete', 0, 'over:success', 0,
}
for i = 9, #ARGV, 2 do
  meta[#meta + 1] = 'cb:' .. ARGV[i]
  meta[#meta + 1] = ARGV[i + 1]
end
redis.call('DEL', KEYS[4], KEYS[5])  -- with no record, whatever is left there is nobody's
redis.call('HSET', KEYS[4], unpack(meta))
set_state('open')  -- meta gets its lifetime
return 'open'
