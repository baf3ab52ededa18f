-- read: the contents of several hashes of one caller in one round trip (reports, remaining).
-- KEYS[i]  hashes to read (all with the caller's hash tag)
-- returns  one flat {field, value, ...} array per key (empty for a missing key)
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HGETALL', KEYS[i])
end
return out
