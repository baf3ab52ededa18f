-- extend: top up the "q" reservations of a live AI request mid-stream, all or nothing.
-- The hard stop asks for more room when a streamed response outgrows what admit reserved; a
-- denial ends the stream. Time is Redis server time (TIME); ARGV[1] overrides it for
-- deterministic tests only. All state is integers (units, microseconds), kept below 2^53.
--
-- KEYS[i]  the period hashes the ops name by index, each followed by its reservation ledger
--          (KEYS[k+1]), as admit's "q" kind; all carry the caller's hash tag (one cluster slot)
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  request id (admit's reservation field "r|<id>" and ledger member)
-- ARGV[3]  lease_us: the reservation now holds until now + lease_us (the stream is alive)
-- ARGV[4]  n, the number of ops; then 4 values per op: key index, field, limit, step
--          field f of hash KEYS[k] holds the units used or reserved, limit is its size
--          (admit's p1), step the units to add (tokens or micro-dollars, >= 0)
-- The reservation is live in KEYS[k] while field "r|<id>" exists: settle deletes it, and
-- admit's sweep deletes it once its lease has ended (and gives its amounts back).
-- If it is not live in some key, or some op has limit - used < step (counting the earlier ops
-- of this call on the same field), nothing changes. Otherwise each op HINCRBYs f by step and
-- adds step to f's amount in "r|<id>" ("name=amount,...": what admit's sweep and settle give
-- back), and the ledger of each key an op names re-scores the request now + lease_us (a key
-- no op names keeps its old lease).
-- returns {1, 0, then per op: limit - used after it} when granted;
--         {0, index of the first op that does not fit (0: not live), then per op:
--          max(0, limit - used)} when denied, and nothing changed

-- #include prelude/now.lua
local rid = ARGV[2]
local lease = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local rfield = 'r|' .. rid

-- the reservation of every key named, in first-use order so the writes below are deterministic
local payloads, order = {}, {}
local live = true
for i = 1, n do
  local k = tonumber(ARGV[4 + (i - 1) * 4 + 1])
  if payloads[k] == nil then
    local p = redis.call('HGET', KEYS[k], rfield)
    if not p then
      live = false
      break
    end
    payloads[k] = p
    order[#order + 1] = k
  end
end

local out = {1, 0}
local stored, pending = {}, {}  -- per key index and field: the counter, and this call's adds
local fits = live
for i = 1, n do
  local base = 4 + (i - 1) * 4
  local k, f = tonumber(ARGV[base + 1]), ARGV[base + 2]
  local limit, step = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  -- a negative step would give back units this request may never have held
  if step < 0 then return redis.error_reply('extend: negative step ' .. ARGV[base + 4]) end
  local id = k .. '|' .. f
  if stored[id] == nil then
    stored[id] = tonumber(redis.call('HGET', KEYS[k], f)) or 0
    pending[id] = 0
  end
  if fits and limit - stored[id] - pending[id] < step then
    fits = false
    out[2] = i
  end
  pending[id] = pending[id] + step
  out[#out + 1] = math.max(0, limit - stored[id])
end
if not fits then
  out[1] = 0
  return out
end

local adds = {}  -- key index -> {names in first-use order, name -> units added}
for i = 1, n do
  local base = 4 + (i - 1) * 4
  local k, f = tonumber(ARGV[base + 1]), ARGV[base + 2]
  local limit, step = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  local id = k .. '|' .. f
  if step > 0 then
    stored[id] = redis.call('HINCRBY', KEYS[k], f, string.format('%d', step))
    local a = adds[k]
    if a == nil then
      a = {names = {}, sums = {}}
      adds[k] = a
    end
    if a.sums[f] == nil then
      a.names[#a.names + 1] = f
      a.sums[f] = 0
    end
    a.sums[f] = a.sums[f] + step
  end
  out[2 + i] = limit - stored[id]
end

for _, k in ipairs(order) do
  local a = adds[k]
  if a ~= nil then
    -- the amounts this reservation gives back (sweep) or settles against (settle) grow too
    local text, seen = '', {}
    for name, amount in string.gmatch(payloads[k], '([^=,]+)=(%d+)') do
      if a.sums[name] ~= nil and not seen[name] then
        seen[name] = true
        amount = string.format('%d', tonumber(amount) + a.sums[name])
      end
      text = text .. name .. '=' .. amount .. ','
    end
    for _, name in ipairs(a.names) do
      if not seen[name] then
        text = text .. name .. '=' .. string.format('%d', a.sums[name]) .. ','
      end
    end
    redis.call('HSET', KEYS[k], rfield, text)
  end
  -- XX: only a member is re-scored, so a ledger is never recreated without its TTL
  redis.call('ZADD', KEYS[k + 1], 'XX', string.format('%d', now + lease), rid)
end
return out
