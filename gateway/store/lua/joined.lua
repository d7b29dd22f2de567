-- The server took these jobs into the batch (+OK). ARGV[6..] their jids.
-- Each becomes a member, counted once however often it is reported; one that already ran (its ACK
-- or FAIL reached the ledger first) is counted as run. In any state: a count must never be lost.
-- A batch with no record has nothing to count into and is left alone.
if current() == 'unknown' then return 0 end
local counts, moved = {}, false
for i = 6, #ARGV do
  moved = move(ARGV[i], JOIN, counts) or moved
end
if moved then note_change(counts) end
return 0
