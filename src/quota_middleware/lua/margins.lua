-- margins: merge this process's learned input margins into the shared hash and read it back.
-- A stored margin rises to a higher one at once and moves 1/8 of the way down to a lower one,
-- so it follows the high end of what the processes see without sticking to an old outlier.
--
-- KEYS[1]  the margins hash (field "format|model" = margin in permille, 1000..2000)
-- ARGV[1]  n, then n pairs: field, permille
-- returns  the whole hash, flat {field, value, ...}

local key = KEYS[1]
local n = tonumber(ARGV[1])
for i = 1, n do
  local f = ARGV[2 * i]
  local ours = tonumber(ARGV[2 * i + 1])
  local stored = tonumber(redis.call('HGET', key, f))
  if stored == nil then
    -- model names are client-chosen: the hash stays bounded
    if redis.call('HLEN', key) < 1024 then redis.call('HSET', key, f, ours) end
  elseif ours > stored then
    redis.call('HSET', key, f, ours)
  elseif ours < stored then
    redis.call('HSET', key, f, stored - math.ceil((stored - ours) / 8))
  end
end
redis.call('PEXPIRE', key, 7 * 86400000)
return redis.call('HGETALL', key)
