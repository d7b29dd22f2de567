-- Prepended to every script (redis.py joins them), so that every script reads a batch the same way.
-- KEYS[1]  the batch's state (string: open | committing | committed | fired)
-- KEYS[2]  the gateways' leases (hash: lease token -> beat)
-- KEYS[3]  the commit attempts (hash: 'w:<id>' waiting or 's:<id>' sent -> beat)
-- KEYS[4]  engine mode only: the batch's meta (hash: counts, callbacks, stages)
-- KEYS[5]  engine mode only: the batch's jobs (hash: jid -> mark)
-- ARGV[1], ARGV[2], ARGV[3]  record lifetimes in ms: open/committing, committed, fired
-- A batch's keys share one hash tag ({<bid>}; in engine mode its tree's, {<tree>}), so a script
-- touches one Redis Cluster slot. meta and jobs live exactly as long as state: every change of
-- state's lifetime is made to them too, here.
--
-- No script reads Redis's clock (TIME): leases and attempts carry beats (counters), and only the
-- gateways measure time, each on its own monotonic clock (docs/fence.md, A1). Key lifetimes are
-- garbage collection only: a leases hash lives the longer of the committed retention (ARGV[2],
-- 45 days by default) and the open-record lifetime past its last use, and is deleted outright once the batch is committed or fired (no
-- lease matters after a commit); so only a step of Redis's clock longer than that could erase a
-- lease in use (the model in tests/model found the hole a shorter lifetime leaves).

local function ttl_for(state)
  if state == 'committed' then return ARGV[2] end
  if state == 'fired' then return ARGV[3] end
  return ARGV[1]
end

-- The engine's meta and jobs (keys[4], keys[5], when given) get the lifetime of the record's state.
local function expire_with_state(keys, ttl)
  for i = 4, #keys do redis.call('PEXPIRE', keys[i], ttl) end
end

-- Set a batch's state (keys: its state, leases, attempts[, meta, jobs]), for that state's lifetime.
local function set_state_of(keys, state)
  local ttl = ttl_for(state)
  redis.call('SET', keys[1], state, 'PX', ttl)
  expire_with_state(keys, ttl)
  if state ~= 'committing' then redis.call('DEL', keys[3]) end
  if state == 'committed' or state == 'fired' then redis.call('DEL', keys[2]) end
end

local function set_state(state)
  set_state_of(KEYS, state)
end

local function current()
  return redis.call('GET', KEYS[1]) or 'unknown'
end

-- A leases or attempts hash is kept that long past its last use (see above).
local function keep(key)
  redis.call('PEXPIRE', key, math.max(tonumber(ARGV[1]), tonumber(ARGV[2])))
end

-- Seal the batch for a commit attempt (beat it) and tell every gateway (they stop admitting at once).
local function seal(attempt, channel, bid)
  if current() ~= 'committing' then set_state('committing') end
  redis.call('HINCRBY', KEYS[3], 'w:' .. attempt, 1)
  keep(KEYS[3])
  redis.call('PUBLISH', channel, bid)
end
