-- rank: the top members of a ranking, or of the sum of several, in one round trip (reports over
-- every caller read the app's rankings instead of SCANning each caller's keys).
-- KEYS[1]  scratch key for the sum (used and deleted only when there are several rankings)
-- KEYS[2..] the rankings (sorted sets, all with the app's hash tag)
-- ARGV[1]  how many members to return, highest first
-- returns  {distinct members, member, score, member, score, ...}
local n = tonumber(ARGV[1])
local src = KEYS[2]
if #KEYS > 2 then
  local sources = {}
  for i = 2, #KEYS do sources[#sources + 1] = KEYS[i] end
  redis.call('ZUNIONSTORE', KEYS[1], #sources, unpack(sources))
  src = KEYS[1]
end
local out = {redis.call('ZCARD', src)}
local top = redis.call('ZREVRANGE', src, 0, n - 1, 'WITHSCORES')
for i = 1, #top do out[#out + 1] = top[i] end
if src == KEYS[1] then redis.call('DEL', KEYS[1]) end
return out
