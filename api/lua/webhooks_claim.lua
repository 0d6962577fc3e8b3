-- Claim due webhook deliveries: the ids in the due set scored <= now, each moved to the end of
-- its lease, in one step so that two replicas never claim the same attempt.
-- KEYS[1]: the due set (job id -> next-attempt time)
-- ARGV[1]: now; ARGV[2]: end of the lease; ARGV[3]: most ids to claim
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id)
end
return ids
