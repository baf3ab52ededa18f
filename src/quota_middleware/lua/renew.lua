-- renew: keep the concurrency slots of a long-lived connection (a WebSocket) held, all or nothing.
-- Admit takes a slot for one lease; a connection holds it for as long as it is open, so the
-- middleware calls this while it lives (every third of the shortest lease). A worker that dies
-- stops renewing, and its slots come back when their leases end (admit sweeps them).
--
-- KEYS[i]  the concurrency sorted sets the connection holds a slot in (admit's "c" keys; all
--          carry the caller's hash tag, one cluster slot)
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  request id (the member admit added)
-- ARGV[3]  n, the number of keys; then 2 values per key: max in flight, lease_us
-- Each key first loses its expired members, as in admit. A member still there is re-scored
-- now + lease_us. One that is gone (its lease ran out before this renewal came and another
-- admit swept it) takes its slot again if the set has room: the connection is still open, so
-- it still counts. If some key has no room for it, nothing changes (but the sweep).
-- Every key written is kept at least lease_us + 1 s, as admit keeps it.
-- returns {1, 0} when every slot is held until now + lease_us;
--         {0, index of the first key whose slot is lost and has no room}

-- #include prelude/now.lua
local rid = ARGV[2]
local n = tonumber(ARGV[3])

for i = 1, n do
  local key, max = KEYS[i], tonumber(ARGV[3 + (i - 1) * 2 + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if not redis.call('ZSCORE', key, rid) and redis.call('ZCARD', key) >= max then
    return {0, i}
  end
end

for i = 1, n do
  local key, lease = KEYS[i], tonumber(ARGV[3 + (i - 1) * 2 + 2])
  redis.call('ZADD', key, string.format('%d', now + lease), rid)
  local ms = math.ceil(lease / 1000) + 1000
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
return {1, 0}
