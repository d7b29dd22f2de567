-- Prepended to every script (redis.py joins them), so that every script reads a batch the same way.
-- KEYS[1]  the batch's state (string: open | committing | committed | fired)
-- KEYS[2]  the gateways' leases (sorted set: gateway id -> expiry, Redis's clock in ms)
-- KEYS[3]  the commit attempts (sorted set: 'w:<id>' waiting or 's:<id>' sent -> expiry)
-- ARGV[1], ARGV[2], ARGV[3]  record lifetimes in ms: open/committing, committed, fired
-- All three keys share the hash tag {<bid>}, so a script touches one Redis Cluster slot.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function ttl_for(state)
  if state == 'committed' then return ARGV[2] end
  if state == 'fired' then return ARGV[3] end
  return ARGV[1]
end

local function set_state(state)
  redis.call('SET', KEYS[1], state, 'PX', ttl_for(state))
  if state ~= 'committing' then redis.call('DEL', KEYS[3]) end
end

-- The batch's state. A committing batch none of whose attempts is live was abandoned by the
-- gateway committing it: if an attempt may have reached the server it reads as committed (the
-- safe side), otherwise the server cannot have committed it and it is open again.
local function current()
  local state = redis.call('GET', KEYS[1])
  if not state then return 'unknown' end
  if state ~= 'committing' then return state end
  if redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') > 0 then return state end
  state = 'open'
  for _, attempt in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    if string.sub(attempt, 1, 2) == 's:' then state = 'committed' end
  end
  set_state(state)
  return state
end

local function lease_live(gateway)
  local expires = redis.call('ZSCORE', KEYS[2], gateway)
  return expires and tonumber(expires) > now
end

local function extend_lease(gateway, ttl)
  redis.call('ZADD', KEYS[2], now + ttl, gateway)
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
end

-- Register a commit attempt; the attempts live at least as long as the record they belong to.
local function attempt_until(member, ttl)
  redis.call('ZADD', KEYS[3], now + ttl, member)
  redis.call('PEXPIRE', KEYS[3], math.max(ttl, redis.call('PTTL', KEYS[1])))
end

-- Seal the batch for a commit attempt and tell every gateway (they stop admitting at once).
local function seal(attempt, ttl, channel, bid)
  if redis.call('GET', KEYS[1]) ~= 'committing' then set_state('committing') end
  attempt_until('w:' .. attempt, ttl)
  redis.call('PUBLISH', channel, bid)
end
