-- prelude/now.lua: the local `now` of every script whose ARGV[1] is "now in microseconds, or ""
-- to read TIME". Redis scripts cannot include files: scripts.source() puts these lines, without
-- this comment, in place of the script's "-- #include prelude/now.lua" line, and the script's
-- SHA is that of the composed text.
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
