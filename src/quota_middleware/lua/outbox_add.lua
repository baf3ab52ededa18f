-- outbox_add: append alert events to the durable outbox, a Redis Stream that the delivery
-- workers read with a consumer group (each event delivered once across workers).
-- KEYS[1]  the outbox stream
-- ARGV[1]  approximate maximum length kept (older entries are trimmed)
-- ARGV[2..] one JSON event each, stored in the entry's "event" field
-- returns  the number of entries added
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[i])
end
return #ARGV - 1
