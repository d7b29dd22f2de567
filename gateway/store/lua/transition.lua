-- Move a batch to a new state if, and only if, it is in one of the allowed states now.
-- KEYS[1]  the batch's state key
-- ARGV[1]  allowed current states, comma-separated; "unknown" stands for "no record"
-- ARGV[2]  the new state
-- ARGV[3]  the new record's time to live, in milliseconds
-- Returns the state the batch had before, moved or not.
local current = redis.call('GET', KEYS[1]) or 'unknown'
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == current then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return current
  end
end
return current
