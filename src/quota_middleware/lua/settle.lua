-- settle: after the response, give back what a request held and charge what it really used.
-- Idempotent per request id: a second settle of the same request changes nothing.
--
-- KEYS[1]  done marker for this request (same hash tag as the caller's keys)
-- KEYS[i]  the keys the operations name by index
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  request id
-- ARGV[3]  how long the done marker is kept (ms)
-- ARGV[4]  n, the number of operations; then 5 values per operation:
--          kind, key index, field, p1, delta
--   "c"  release the concurrency slot: ZREM KEYS[k] request id
--   "b"  move the GCRA bucket in hash KEYS[k] field f by delta units: p1 = interval_us. A refund
--        never fills the bucket beyond full; a surcharge may run it into debt.
--   "q"  add delta to the calendar counter hash KEYS[k] field f (never below 0); p1 = TTL ms
-- returns 1 when applied, 0 when this request was already settled

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', tonumber(ARGV[3])) then
  return 0
end
local rid = ARGV[2]
local n = tonumber(ARGV[4])
for i = 1, n do
  local base = 4 + (i - 1) * 5
  local kind = ARGV[base + 1]
  local key = KEYS[tonumber(ARGV[base + 2])]
  local f = ARGV[base + 3]
  local p1 = tonumber(ARGV[base + 4])
  local delta = tonumber(ARGV[base + 5])
  if kind == 'c' then
    redis.call('ZREM', key, rid)
  elseif kind == 'b' then
    local tat = tonumber(redis.call('HGET', key, f)) or now
    if tat < now then tat = now end
    tat = tat + delta * p1
    if tat <= now then
      redis.call('HDEL', key, f)
    else
      redis.call('HSET', key, f, tat)
      local ms = math.ceil((tat - now) / 1000) + 1000
      if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
    end
  elseif kind == 'q' then
    local v = redis.call('HINCRBY', key, f, delta)
    if v < 0 then redis.call('HSET', key, f, 0) end
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, p1) end
  else
    return redis.error_reply('settle: unknown operation ' .. tostring(kind))
  end
end
return 1
