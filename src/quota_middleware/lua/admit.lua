-- admit: check every limit of one request and charge them all, or charge nothing.
-- Time is Redis server time (TIME), so app servers with skewed clocks agree; ARGV[1] overrides it
-- for deterministic tests only. All state is integers: microseconds and units (tokens, requests,
-- micro-dollars), kept below 2^53.
--
-- KEYS[i]  the keys the limits name by index; all carry the caller's hash tag (one cluster slot)
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  request id (member of concurrency sets and reservation ledgers)
-- ARGV[3]  lease_us: how long a reservation on "q" counters holds if it is never settled
-- ARGV[4]  n, the number of limits; then 7 values per limit:
--          kind, key index, field, p1, p2, cost, min_cost
--   "b"  GCRA token bucket in hash KEYS[k], field f holds the theoretical arrival time (TAT, us).
--        p1 = interval_us (time to refill one unit), p2 = tau_us (burst * interval).
--   "c"  concurrency: sorted set KEYS[k] of request ids scored by lease end (us).
--        p1 = max in flight, p2 = lease_us. cost/min_cost are 1.
--   "q"  calendar counter: hash KEYS[k] (one key per period), field f holds units used or
--        reserved. p1 = limit, p2 = period end (unix us); the key expires an hour after it.
--        KEYS[k+1] is the period's reservation ledger (request id scored by lease end); the
--        hash keeps each reservation as field "r|<id>" = "name=amount,...". Expired
--        reservations are given back here, so a dead worker's reservation frees itself.
--   "Q"  a "q" counter of the caller's tenant (hash_tag = "tenant": its key shares the caller's
--        slot): the operator's limit is its hash's field "<f>:limit" (Controls.set_budget), not
--        a caller override; 0 (the kill switch) refuses until the period ends.
--   A limit charges min(cost, available) and admits when available >= min_cost, so a reservation
--   never exceeds what is left; for request limits min_cost == cost. The field of a "c" limit is
--   its name (only overrides read it).
-- then, optionally, the runtime controls (controls.py), 3 values after the limits:
--          route class ("a": an AI route), caller controls key index, tenant controls key index
--          (0: none). The caller's hash holds "block" = "until_us|scope|reason" (until 0: no end;
--          scope "ai" blocks AI routes only) and "o|<limit name>" = "until_us|p1|p2" (p2 may be
--          empty: kept), the operator's numbers used instead of the plan's. The tenant's key
--          holds its own "block" field. An expired field counts as absent.
-- returns {allowed, denied_index (0 if none), retry_us (-1: can never fit), now_us,
--          then per limit: remaining, reset_us, charged, then per overridden limit: index, p1, p2}
--         or, blocked: {0, -1, retry_us (-1: until unblocked), now_us, reason, "caller"|"tenant"}

-- #include prelude/now.lua
local rid = ARGV[2]
local lease = tonumber(ARGV[3])
local n = tonumber(ARGV[4])

-- runtime controls: a block refuses before anything is read or charged
local ctl = {}
local c0 = 4 + n * 7
if ARGV[c0 + 2] then
  local ai = ARGV[c0 + 1] == 'a'
  local function block(v, who)
    if not v then return nil end
    local u, scope, why = string.match(v, '^(%d+)|(%a*)|(.*)$')
    u = tonumber(u)
    if not u or (u > 0 and u <= now) or (scope == 'ai' and not ai) then return nil end
    return {0, -1, u > 0 and u - now or -1, now, why, who}
  end
  local flat = redis.call('HGETALL', KEYS[tonumber(ARGV[c0 + 2])])
  for j = 1, #flat, 2 do ctl[flat[j]] = flat[j + 1] end
  local b = block(ctl['block'], 'caller')
  if b then return b end
  local t = tonumber(ARGV[c0 + 3])
  if t > 0 then
    b = block(redis.call('HGET', KEYS[t], 'block'), 'tenant')
    if b then return b end
  end
end
local overridden = {}

-- give back reservations whose lease ended without a settle (their worker died)
local swept = {}
for i = 1, n do
  local base = 4 + (i - 1) * 7
  local k = tonumber(ARGV[base + 2])
  local kind = ARGV[base + 1]
  if (kind == 'q' or kind == 'Q') and not swept[k] then
    swept[k] = true
    local key, ledger = KEYS[k], KEYS[k + 1]
    for _, r in ipairs(redis.call('ZRANGEBYSCORE', ledger, '-inf', now, 'LIMIT', 0, 100)) do
      local payload = redis.call('HGET', key, 'r|' .. r)
      if payload then
        for name, amount in string.gmatch(payload, '([^=,]+)=(%d+)') do
          if redis.call('HINCRBY', key, name, '-' .. amount) < 0 then
            redis.call('HSET', key, name, 0)
          end
        end
        redis.call('HDEL', key, 'r|' .. r)
      end
      redis.call('ZREM', ledger, r)
    end
  end
end

local out = {1, 0, 0, now}
local writes = {}
local undo = {}  -- per limit: {remaining, reset} to report if the request is denied after all
local denied = 0
local retry = 0

for i = 1, n do
  local base = 4 + (i - 1) * 7
  local kind = ARGV[base + 1]
  local kidx = tonumber(ARGV[base + 2])
  local key = KEYS[kidx]
  local f = ARGV[base + 3]
  local p1 = tonumber(ARGV[base + 4])
  local p2 = tonumber(ARGV[base + 5])
  local cost = tonumber(ARGV[base + 6])
  local min_cost = tonumber(ARGV[base + 7])
  local o = nil
  local tlimit = false
  if kind == 'Q' then
    kind = 'q'
    local v = tonumber(redis.call('HGET', key, f .. ':limit'))
    if v then
      p1, tlimit = v, true
      overridden[#overridden + 1] = {i, p1, p2}
    end
  else
    o = ctl['o|' .. f]
  end
  if o then
    local u, o1, o2 = string.match(o, '^(%d+)|(%d+)|(%d*)$')
    u = tonumber(u)
    if u and (u == 0 or u > now) then
      p1 = tonumber(o1)
      if o2 ~= '' then p2 = tonumber(o2) end
      overridden[#overridden + 1] = {i, p1, p2}
    end
  end
  local remaining, reset, charged, wait = 0, 0, 0, 0
  local before_remaining, before_reset

  if kind == 'b' then
    local tat = tonumber(redis.call('HGET', key, f)) or now
    if tat < now then tat = now end
    local available = math.floor((p2 - (tat - now)) / p1)
    before_remaining, before_reset = math.max(0, available), tat - now
    if min_cost * p1 > p2 then
      wait = -1
    elseif available < min_cost then
      wait = tat + min_cost * p1 - p2 - now
    else
      charged = math.min(cost, available)
      local new_tat = tat + charged * p1
      writes[#writes + 1] = {'b', key, f, new_tat, new_tat - now}
      tat = new_tat
    end
    remaining = math.max(0, math.floor((p2 - (tat - now)) / p1))
    reset = tat - now
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local held = redis.call('ZSCORE', key, rid)
    local count = redis.call('ZCARD', key)
    before_remaining, before_reset = math.max(0, p1 - count), 0
    if held then
      charged = 1
      remaining = p1 - count
    elseif count >= p1 then
      wait = 1000000
    else
      charged = 1
      remaining = p1 - count - 1
      writes[#writes + 1] = {'c', key, rid, now + p2, p2}
    end
  elseif kind == 'q' then
    local used = tonumber(redis.call('HGET', key, f)) or 0
    local available = p1 - used
    -- Once a reservation has been cut short this period ("f!" set), only whole reservations
    -- are admitted: refunds must not let a stream of cut-short requests each overshoot.
    if min_cost < cost and redis.call('HEXISTS', key, f .. '!') == 1 then min_cost = cost end
    before_remaining, before_reset = math.max(0, available), p2 - now
    if min_cost > p1 and tlimit then
      wait = p2 - now  -- lowered by an operator: refused until the period ends
    elseif min_cost > p1 then
      wait = -1
    elseif available < min_cost then
      wait = p2 - now
    else
      charged = math.min(cost, available)
      used = used + charged
      writes[#writes + 1] = {'q', key, f, charged, p2 - now + 3600000000, KEYS[kidx + 1]}
      if charged < cost then writes[#writes + 1] = {'q', key, f .. '!', 1, 0, ''} end
    end
    remaining = math.max(0, p1 - used)
    reset = p2 - now
  else
    return redis.error_reply('admit: unknown limit kind ' .. tostring(kind))
  end

  if wait ~= 0 then
    -- several limits may deny: the caller must wait for the slowest; -1 (never) wins
    if denied == 0 then denied = i end
    if wait < 0 or retry < 0 then retry = -1 elseif wait > retry then retry = wait end
  end
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = charged
  undo[i] = {before_remaining, before_reset}
end

if denied > 0 then
  out[1] = 0
  out[2] = denied
  out[3] = retry
  -- a denied request changes nothing: report every limit as it stands, uncharged
  for i = 1, n do
    local o = 4 + (i - 1) * 3
    if out[o + 3] > 0 then
      out[o + 1] = undo[i][1]
      out[o + 2] = undo[i][2]
      out[o + 3] = 0
    end
  end
  for _, v in ipairs(overridden) do
    out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = v[3]
  end
  return out
end

local ttl = {}
local held = {}
for _, w in ipairs(writes) do
  local kind, key = w[1], w[2]
  if kind == 'b' then
    redis.call('HSET', key, w[3], w[4])
  elseif kind == 'c' then
    redis.call('ZADD', key, w[4], w[3])
  elseif w[6] == '' then
    redis.call('HSET', key, w[3], w[4])
  else
    redis.call('HINCRBY', key, w[3], w[4])
    if lease > 0 and w[4] > 0 then
      if not held[key] then
        held[key] = {w[6], ''}
        ttl[w[6]] = math.max(ttl[w[6]] or 0, math.ceil(w[5] / 1000))
      end
      held[key][2] = held[key][2] .. w[3] .. '=' .. string.format('%d', w[4]) .. ','
    end
  end
  -- a key lives until its slowest field is back to "full" (+1 s slack); never shorten it
  local ms = math.ceil(w[5] / 1000) + 1000
  if (ttl[key] or 0) < ms then ttl[key] = ms end
end
for key, h in pairs(held) do
  redis.call('HSET', key, 'r|' .. rid, h[2])
  redis.call('ZADD', h[1], now + lease, rid)
end
for key, ms in pairs(ttl) do
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
for _, v in ipairs(overridden) do
  out[#out + 1] = v[1]; out[#out + 1] = v[2]; out[#out + 1] = v[3]
end
return out
