-- key_lookup: read one API key record and its state by the store's clock.
-- The caller compares the digest (in constant time); this script never sees the key.
--
-- KEYS[1]  the key's record, hash {prefix}:key:{<key_id>} with fields caller, plan, tenant,
--          created (us), expires (us, 0: never), revoked ("0"/"1"), digest (hex SHA-256)
-- ARGV[1]  now in microseconds, or "" to read TIME
-- returns {} when there is no record, else
--         {caller, plan ("" for none), tenant, created, expires, revoked, digest, state}
--         as strings; state is "active", "revoked" or "expired"

-- #include prelude/now.lua
local r = redis.call('HMGET', KEYS[1], 'caller', 'plan', 'tenant', 'created', 'expires',
                     'revoked', 'digest')
if not r[1] then
  return {}
end
local expires = tonumber(r[5]) or 0
local state = 'active'
if r[6] == '1' then
  state = 'revoked'
elseif expires > 0 and expires <= now then
  state = 'expired'
end
return {r[1], r[2] or '', r[3] or 'default', r[4] or '0', r[5] or '0', r[6] or '0', r[7] or '',
        state}
