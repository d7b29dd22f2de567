-- Begin (or join) a commit: seal the batch and register the attempt.
-- ARGV[4] attempt id, ARGV[5] attempt time to live in ms, ARGV[6] channel, ARGV[7] bid,
-- ARGV[8] '1' to adopt a batch with no record (else it is left alone: the gateway asks the server).
-- Returns the state before; committed and fired batches are left alone (a repeated commit).
local before = current()
if before == 'unknown' and ARGV[8] ~= '1' then return before end
if before == 'open' or before == 'unknown' or before == 'committing' then
  seal(ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7])
end
return before
