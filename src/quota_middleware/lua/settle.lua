-- settle: after the response, give back what a request held and charge what it really used.
-- Idempotent per request id: a second settle of the same request changes nothing.
--
-- KEYS[1]  done marker for this request (same hash tag as the caller's keys)
-- KEYS[i]  the keys the operations name by index
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  request id
-- ARGV[3]  how long the done marker is kept (ms)
-- ARGV[4]  n, the number of operations; then 5 values per operation:
--          kind, key index, field, p1, p2
--   "c"  release the concurrency slot: ZREM KEYS[k] request id
--   "b"  move the GCRA bucket in hash KEYS[k] field f by p2 units (actual - reserved);
--        p1 = interval_us. A refund never fills the bucket beyond full; a surcharge may run it
--        into debt, which later requests wait out.
--   "q"  calendar counter hash KEYS[k] field f, ledger KEYS[k+1]: p1 = reserved, p2 = actual.
--        While the reservation is live the counter moves by actual - reserved, reserved being
--        what the reservation's own record "r|<id>" says (admit and extend keep it; p1 where
--        it names no such field); if its lease already ran out (and admit gave it back), the
--        whole actual is charged. Field "f#"
--        adds up the actual usage alone.
--   "u"  usage record: HINCRBY KEYS[k] f by p2 and keep the key p1 ms
--   "r"  ranking: ZINCRBY KEYS[k] by p2 for member f and keep the key p1 ms
--   "e"  keep KEYS[k] at least p1 ms (a period's counters live until the period ends + 1 h;
--        a key settle creates, like the app budgets', gets its lifetime here)
--   "t"  thresholds of the actual usage "f#" in hash KEYS[k] (after the "q" ops, so reservations
--        of requests still in flight never trigger an alert): p1 = the limit, p2 = the
--        percentages ("50,80,100"). Each one crossed for the first time this period (marker
--        field "f@pct", set with HSETNX, so concurrent settles crossing together fire once)
--        becomes an event.
--   "h"  usage spike: hash KEYS[k] holds tokens per hour (field = hour number); p1 = tokens to
--        add, p2 = "multiple_milli,floor,window_hours". When this hour exceeds multiple x the
--        average of the trailing window and floor, one event per hour (marker "spike@hour").
-- returns {1, events...} when applied ({0} when this request was already settled); each event
--         is 4 values: kind ("t" or "h"), name, percentage or hour, used

local function event(out, kind, name, level, used)
  out[#out + 1] = kind
  out[#out + 1] = name
  out[#out + 1] = level
  out[#out + 1] = used
end

-- #include prelude/now.lua
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', tonumber(ARGV[3])) then
  return {0}
end
local out = {1}
local rid = ARGV[2]
local n = tonumber(ARGV[4])
local live = {}
for i = 1, n do
  local base = 4 + (i - 1) * 5
  local kind = ARGV[base + 1]
  local kidx = tonumber(ARGV[base + 2])
  local key = KEYS[kidx]
  local f = ARGV[base + 3]
  local p1 = tonumber(ARGV[base + 4])
  local p2 = tonumber(ARGV[base + 5])
  if kind == 'c' then
    redis.call('ZREM', key, rid)
  elseif kind == 'b' then
    local tat = tonumber(redis.call('HGET', key, f)) or now
    if tat < now then tat = now end
    tat = tat + p2 * p1
    if tat <= now then
      redis.call('HDEL', key, f)
    else
      redis.call('HSET', key, f, tat)
      local ms = math.ceil((tat - now) / 1000) + 1000
      if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
    end
  elseif kind == 'q' then
    if live[key] == nil then
      -- the reservation as admit and extend recorded it: what this request really holds here
      -- (p1, the app's view, is only a fallback: an extend whose reply was lost grew it)
      local payload = redis.call('HGET', key, 'r|' .. rid)
      live[key] = false
      if payload then
        local held = {}
        for name, amount in string.gmatch(payload, '([^=,]+)=(%d+)') do
          held[name] = tonumber(amount)
        end
        live[key] = held
        redis.call('HDEL', key, 'r|' .. rid)
        redis.call('ZREM', KEYS[kidx + 1], rid)
      end
    end
    local delta = p2
    if live[key] then delta = p2 - (live[key][f] or p1) end
    if delta ~= 0 then
      if redis.call('HINCRBY', key, f, string.format('%d', delta)) < 0 then
        redis.call('HSET', key, f, 0)
      end
    end
    -- "f#" counts actual usage only (no reservations in flight): what thresholds are about
    if p2 > 0 then redis.call('HINCRBY', key, f .. '#', string.format('%d', p2)) end
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, 86400000) end
  elseif kind == 'u' then
    redis.call('HINCRBY', key, f, string.format('%d', p2))
    redis.call('PEXPIRE', key, p1)
  elseif kind == 'r' then
    redis.call('ZINCRBY', key, string.format('%d', p2), f)
    redis.call('PEXPIRE', key, p1)
  elseif kind == 'e' then
    if redis.call('EXISTS', key) == 1 and redis.call('PTTL', key) < p1 then
      redis.call('PEXPIRE', key, p1)
    end
  elseif kind == 't' then
    local used = tonumber(redis.call('HGET', key, f .. '#')) or 0
    for pct in string.gmatch(ARGV[base + 5], '%d+') do
      if used * 100 >= tonumber(pct) * p1 and redis.call('HSETNX', key, f .. '@' .. pct, 1) == 1 then
        event(out, 't', f, tonumber(pct), used)
      end
    end
  elseif kind == 'h' then
    local hour = math.floor(now / 3600000000)
    local multiple, floor, window = string.match(ARGV[base + 5], '(%d+),(%d+),(%d+)')
    multiple, floor, window = tonumber(multiple), tonumber(floor), tonumber(window)
    local current = redis.call('HINCRBY', key, hour, string.format('%d', p1))
    local past = 0
    local fields = redis.call('HGETALL', key)
    for j = 1, #fields, 2 do
      local h = tonumber(fields[j])
      if h then
        if h < hour - window then
          redis.call('HDEL', key, fields[j])
        elseif h < hour then
          past = past + tonumber(fields[j + 1])
        end
      elseif fields[j] ~= 'spike@' .. hour then
        redis.call('HDEL', key, fields[j])  -- markers of earlier hours
      end
    end
    -- current > multiple/1000 * past/window, in integers
    if current >= floor and current * window * 1000 > multiple * past
        and redis.call('HSETNX', key, 'spike@' .. hour, 1) == 1 then
      event(out, 'h', 'spike', hour, current)
    end
    redis.call('PEXPIRE', key, (window + 2) * 3600000)
  else
    return redis.error_reply('settle: unknown operation ' .. tostring(kind))
  end
end
return out
