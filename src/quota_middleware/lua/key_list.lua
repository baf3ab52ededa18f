-- key_list: the index of API key ids, a set on its own key (its own cluster slot). Records live
-- under their own hash tags, so the caller reads them with key_lookup, one call per key.
--
-- KEYS[1]  the index set {prefix}:keys
-- ARGV[1]  "list", "add" or "remove"
-- ARGV[2..] key ids to add or remove
-- returns for "list": every key id, sorted; for "add" / "remove": how many ids changed

local op = ARGV[1]
if op == 'list' then
  local ids = redis.call('SMEMBERS', KEYS[1])
  table.sort(ids)
  return ids
end
local n = 0
for i = 2, #ARGV do
  if op == 'add' then
    n = n + redis.call('SADD', KEYS[1], ARGV[i])
  elseif op == 'remove' then
    n = n + redis.call('SREM', KEYS[1], ARGV[i])
  else
    return redis.error_reply('key_list: unknown operation ' .. tostring(op))
  end
end
return n
