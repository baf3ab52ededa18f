-- key_revoke: mark an API key revoked. The record is kept (for listing) for the retention time.
--
-- KEYS[1]  the key's record, hash {prefix}:key:{<key_id>} (see key_lookup.lua)
-- ARGV[1]  now in microseconds, or "" to read TIME
-- ARGV[2]  retention in ms
-- returns 1 when revoked now, 0 when there is no such key or it was revoked already

-- #include prelude/now.lua
local r = redis.call('HMGET', KEYS[1], 'caller', 'revoked')
if not r[1] or r[2] == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'revoked', 1, 'revoked_at', now)
local retention = tonumber(ARGV[2])
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 or pttl > retention then
  redis.call('PEXPIRE', KEYS[1], retention)
end
return 1
