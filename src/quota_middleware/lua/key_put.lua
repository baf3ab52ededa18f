-- key_put: store a new API key record; never overwrites one (a key id collision is refused).
--
-- KEYS[1]  the key's record, hash {prefix}:key:{<key_id>} (see key_lookup.lua)
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  caller id
-- ARGV[3]  plan name, "" for none (the default plan)
-- ARGV[4]  tenant
-- ARGV[5]  lifetime in microseconds, 0 for a key that never expires
-- ARGV[6]  hex SHA-256 digest of the key
-- ARGV[7]  retention in ms: an expired record is dropped this long after it expires
-- returns {1, created_us, expires_us (0: never)}, or {0} when the record exists already

-- #include prelude/now.lua
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0}
end
local ttl = tonumber(ARGV[5])
local expires = 0
if ttl > 0 then
  expires = now + ttl
end
redis.call('HSET', KEYS[1], 'caller', ARGV[2], 'plan', ARGV[3], 'tenant', ARGV[4],
           'created', now, 'expires', expires, 'revoked', 0, 'digest', ARGV[6])
if expires > 0 then
  redis.call('PEXPIREAT', KEYS[1], math.floor(expires / 1000) + tonumber(ARGV[7]))
end
return {1, now, expires}
