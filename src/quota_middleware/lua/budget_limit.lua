-- budget_limit: an operator's limit of a shared budget (an app budget, a tenant's) for the
-- current period: field "<name>:limit" of the period's counter hash, which the admission's
-- copy of the counters reads (core._engine._app_gate) in place of the configured limit.
-- KEYS[1]  the budget's period key
-- ARGV[1]  the budget's name
-- ARGV[2]  the new limit (micro-USD or tokens), or "" to remove the override
-- ARGV[3]  how long to keep the key (ms): until the period ends, plus an hour
-- returns  {the override before ("" when none), the amount spent so far}
local field = ARGV[1] .. ':limit'
local before = redis.call('HGET', KEYS[1], field) or ''
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], field)
else
  redis.call('HSET', KEYS[1], field, ARGV[2])
  if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3])) end
end
return {before, tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')}
