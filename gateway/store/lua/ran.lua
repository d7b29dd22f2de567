-- A job of the batch was ACKed or FAILed at the server; then evaluate.
-- ARGV[6] jid, ARGV[7] '1' ACK / '0' FAIL, ARGV[8] the token of any claim this makes.
-- Returns the claims made, as evaluate does.
if current() == 'unknown' then return {} end
local counts = {}
if move(ARGV[6], ARGV[7] == '1' and ACK or FAIL, counts) then note_change(counts) end
return evaluate(ARGV[8])
