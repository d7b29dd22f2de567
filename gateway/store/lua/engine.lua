-- Joined after prelude.lua in front of every engine script (redis.py joins them): the engine's
-- marks, its counts and its evaluate walk, written once.
-- KEYS[1..5]  the batch's state, leases, attempts, meta, jobs (see prelude.lua)
-- ARGV[4]     the key prefix of the batch's tree, '<prefix>{<tree>}:'. Every batch of a tree has
--             its keys under it (one hash tag, one Cluster slot), so a script reaches the keys of
--             any batch of the tree, its parent's above all, by that batch's bid alone.
-- ARGV[5]     the batch's bid
-- ARGV[6..]   the operation's own arguments
--
-- meta fields: parent ('' for a root), description, created_at, cb:<kind> (the callback job's
-- JSON; absent if none), total, ran, acked, failing, st:<kind> ('' / '1' enqueued / '2' ACKed),
-- children, over:<kind> (children whose stage is over, once each), told:<kind> ('1': told the
-- parent), claim:<kind> (token of an unconfirmed claim), progress.
-- jobs marks: p member not run yet, f member failing, a member ACKed; A / F ACKed / failed before
-- it was counted (not a member yet).

local KINDS = {'complete', 'success'}  -- firing order: complete is always claimed first

local function keys_of(bid)
  local base = ARGV[4] .. bid .. ':'
  return {base .. 'state', base .. 'leases', base .. 'attempts', base .. 'meta', base .. 'jobs'}
end

-- meta and jobs are created by HSET/HINCRBY without a lifetime: give them the state's (what is
-- left of it), so that they go with the record. PTTL is not TIME: it is the key's own lifetime.
local function expire_with_record(keys)
  local left = redis.call('PTTL', keys[1])
  if left > 0 then expire_with_state(keys, left) end
end

-- Moves of a job's mark: mark before (false: no mark) -> {mark after, counters it adds}. A mark
-- absent from a table does not move.
local JOIN = {
  [false] = {'p', {total = 1}},
  A = {'a', {total = 1, ran = 1, acked = 1}},
  F = {'f', {total = 1, ran = 1, failing = 1}},
}
local ACK = {
  p = {'a', {ran = 1, acked = 1}},
  f = {'a', {acked = 1, failing = -1}},  -- the retry succeeded
  [false] = {'A', {}},  -- ran before its count arrived: kept until joined counts it
  F = {'A', {}},
}
local FAIL = {
  p = {'f', {ran = 1, failing = 1}},
  [false] = {'F', {}},
}

-- Move jid's mark by `moves`, adding its counters into `counts`. Returns true if it moved.
local function move(jid, moves, counts)
  local step = moves[redis.call('HGET', KEYS[5], jid)]
  if not step then return false end
  redis.call('HSET', KEYS[5], jid, step[1])
  for counter, delta in pairs(step[2]) do counts[counter] = (counts[counter] or 0) + delta end
  return true
end

-- Record that a call changed something: the counters it added, and progress bumped. jobs and meta
-- may have been created just now.
local function note_change(counts)
  for counter, delta in pairs(counts) do redis.call('HINCRBY', KEYS[4], counter, delta) end
  redis.call('HINCRBY', KEYS[4], 'progress', 1)
  expire_with_record(KEYS)
end

local META = {'parent', 'total', 'ran', 'acked', 'children', 'cb:complete', 'cb:success',
              'st:complete', 'st:success', 'over:complete', 'over:success', 'told:complete', 'told:success'}

local function read_meta(key)
  local values = redis.call('HMGET', key, unpack(META))
  local meta = {}
  for i, field in ipairs(META) do meta[field] = values[i] end  -- false: absent
  return meta
end

-- From ARGV[5] up to its root: claim each callback that is due, complete first (stage '1', the
-- claim under `token`, the batch fired), and tell the parent each stage that is over, once.
-- A fired batch never takes a job again, so counts only move towards readiness: nothing here is
-- ever undone. Returns the claims made, as {bid, kind, callback job} each.
local function evaluate(token)
  local claims = {}
  local bid = ARGV[5]
  while bid do
    local keys = keys_of(bid)
    local state = redis.call('GET', keys[1])
    if not state then break end  -- no record: nothing to fire, nobody to tell
    local meta = read_meta(keys[4])
    local committed = state == 'committed' or state == 'fired'
    local function n(field) return tonumber(meta[field] or 0) end
    local function ready(kind)
      if not committed or n('over:' .. kind) ~= n('children') then return false end
      if kind == 'complete' then return n('ran') == n('total') end
      return n('acked') == n('total') and (not meta['cb:complete'] or meta['st:complete'] == '2')
    end
    for _, kind in ipairs(KINDS) do
      if meta['cb:' .. kind] and (meta['st:' .. kind] or '') == '' and ready(kind) then
        meta['st:' .. kind] = '1'
        redis.call('HSET', keys[4], 'st:' .. kind, '1', 'claim:' .. kind, token)
        set_state_of(keys, 'fired')
        claims[#claims + 1] = {bid, kind, meta['cb:' .. kind]}
      end
    end
    local parent = meta['parent']
    if not parent or parent == '' then break end
    local parent_keys = keys_of(parent)
    if redis.call('EXISTS', parent_keys[1]) == 0 then break end
    for _, kind in ipairs(KINDS) do
      local over
      if meta['cb:' .. kind] then over = meta['st:' .. kind] == '2' else over = ready(kind) end
      if over and meta['told:' .. kind] ~= '1' then
        redis.call('HSET', keys[4], 'told:' .. kind, '1')
        redis.call('HINCRBY', parent_keys[4], 'over:' .. kind, 1)
        expire_with_record(parent_keys)
      end
    end
    bid = parent
  end
  return claims
end
