-- Begin (or join) a commit: seal the batch and register (beat) the attempt.
-- ARGV[4] attempt id, ARGV[5] channel, ARGV[6] bid,
-- ARGV[7] '1' to adopt a batch with no record (else it is left alone: the gateway asks the server).
-- Returns the state before; committed and fired batches are left alone (a repeated commit).
local before = current()
if before == 'unknown' and ARGV[7] ~= '1' then return before end
if before == 'open' or before == 'unknown' or before == 'committing' then
  seal(ARGV[4], ARGV[5], ARGV[6])
end
return before
