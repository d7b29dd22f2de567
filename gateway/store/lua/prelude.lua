-- Prepended to every script (redis.py joins them), so that every script reads a batch the same way.
-- KEYS[1]  the batch's state (string: open | committing | committed | fired)
-- KEYS[2]  the gateways' leases (hash: lease token -> beat)
-- KEYS[3]  the commit attempts (hash: 'w:<id>' waiting or 's:<id>' sent -> beat)
-- ARGV[1], ARGV[2], ARGV[3]  record lifetimes in ms: open/committing, committed, fired
-- All three keys share the hash tag {<bid>}, so a script touches one Redis Cluster slot.
--
-- No script reads Redis's clock (TIME): leases and attempts carry beats (counters), and only the
-- gateways measure time, each on its own monotonic clock (docs/fence.md, A1). Key lifetimes are
-- garbage collection only, and every one of them is at least the batch record's own.

local function ttl_for(state)
  if state == 'committed' then return ARGV[2] end
  if state == 'fired' then return ARGV[3] end
  return ARGV[1]
end

local function set_state(state)
  redis.call('SET', KEYS[1], state, 'PX', ttl_for(state))
  if state ~= 'committing' then redis.call('DEL', KEYS[3]) end
end

local function current()
  return redis.call('GET', KEYS[1]) or 'unknown'
end

-- A leases or attempts hash lives at least as long as the open-record lifetime and the record.
local function keep(key)
  redis.call('PEXPIRE', key, math.max(tonumber(ARGV[1]), redis.call('PTTL', KEYS[1])))
end

-- Seal the batch for a commit attempt (beat it) and tell every gateway (they stop admitting at once).
local function seal(attempt, channel, bid)
  if current() ~= 'committing' then set_state('committing') end
  redis.call('HINCRBY', KEYS[3], 'w:' .. attempt, 1)
  keep(KEYS[3])
  redis.call('PUBLISH', channel, bid)
end
