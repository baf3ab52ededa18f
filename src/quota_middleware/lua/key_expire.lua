-- key_expire: bring an API key's expiry forward (the grace period of a rotated key). It never
-- extends a key's life, and never touches a revoked or expired key.
--
-- KEYS[1]  the key's record, hash {prefix}:key:{<key_id>} (see key_lookup.lua)
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  grace in microseconds (>= 0): the key then expires at min(its expiry, now + grace)
-- ARGV[3]  retention in ms: the record is dropped this long after it expires
-- returns {1, expires_us} when the key is active (its expiry, possibly unchanged), else
--         {0, state}: state is "missing", "revoked" or "expired"

-- #include prelude/now.lua
local r = redis.call('HMGET', KEYS[1], 'caller', 'expires', 'revoked')
if not r[1] then
  return {0, 'missing'}
end
if r[3] == '1' then
  return {0, 'revoked'}
end
local expires = tonumber(r[2]) or 0
if expires > 0 and expires <= now then
  return {0, 'expired'}
end
local at = now + tonumber(ARGV[2])
if expires == 0 or at < expires then
  expires = at
  redis.call('HSET', KEYS[1], 'expires', expires)
  redis.call('PEXPIREAT', KEYS[1], math.floor(expires / 1000) + tonumber(ARGV[3]))
end
return {1, expires}
