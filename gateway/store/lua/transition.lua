-- Move a batch to a new state if, and only if, it is in one of the allowed states now; the record
-- then lives as long as that state's records do (so committed -> committed refreshes a record).
-- ARGV[4]  allowed current states, comma-separated; "unknown" stands for "no record"
-- ARGV[5]  the new state
-- Returns the state the batch had before, moved or not.
local before = current()
for allowed in string.gmatch(ARGV[4], '[^,]+') do
  if allowed == before then
    set_state(ARGV[5])
    return before
  end
end
return before
