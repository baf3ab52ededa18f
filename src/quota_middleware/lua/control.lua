-- control: write or read one runtime-controls hash (controls.py), on the store's clock, so a
-- block's or an override's expiry is Redis server time like every limit's.
--
-- KEYS[1]  a caller's controls hash, or a tenant's (or its copy in one cluster slot)
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  "set", "del" or "get"
-- ARGV[3]  the field ("block", "o|<limit name>")
-- ARGV[4]  set: the value after its expiry ("scope|reason", "p1|p2")
-- ARGV[5]  set: lifetime in us (0: none); ARGV[6] set: the absolute end in us, which wins when
--          > 0 (every copy of a tenant's block ends at the same instant)
-- Each field is stored as "until_us|value" (until 0: no end); the key expires with its last
-- field, so a store holds no control that has lapsed everywhere.
-- returns set: {now, until_us}; del: {now, 1 if removed else 0}; get: {now, field, value, ...}
-- with lapsed fields left out

-- #include prelude/now.lua
local key, op, field = KEYS[1], ARGV[2], ARGV[3]

local function live(v)
  local u = tonumber(string.match(v, '^(%d+)|'))
  return u ~= nil and (u == 0 or u > now), u
end

local function expire_with_last()
  local last = -1
  local flat = redis.call('HGETALL', key)
  for j = 2, #flat, 2 do
    local ok, u = live(flat[j])
    if not ok then
      redis.call('HDEL', key, flat[j - 1])
    elseif u == 0 then
      last = 0
    elseif last ~= 0 and u > last then
      last = u
    end
  end
  if last == 0 then
    redis.call('PERSIST', key)
  elseif last > 0 then
    redis.call('PEXPIREAT', key, math.ceil(last / 1000) + 1000)
  end
end

if op == 'set' then
  local life, at = tonumber(ARGV[5]), tonumber(ARGV[6])
  local u = 0
  if at > 0 then u = at elseif life > 0 then u = now + life end
  redis.call('HSET', key, field, string.format('%d', u) .. '|' .. ARGV[4])
  expire_with_last()
  return {now, u}
elseif op == 'del' then
  local removed = redis.call('HDEL', key, field)
  expire_with_last()
  return {now, removed}
elseif op == 'get' then
  local out = {now}
  local flat = redis.call('HGETALL', key)
  for j = 1, #flat, 2 do
    if live(flat[j + 1]) then
      out[#out + 1] = flat[j]
      out[#out + 1] = flat[j + 1]
    end
  end
  return out
end
return redis.error_reply('control: unknown operation ' .. tostring(op))
