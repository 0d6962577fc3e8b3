-- Record a webhook delivery unless one for the job is recorded (a second add is a no-op, so a
-- delivery under way keeps its attempts and schedule).
-- KEYS[1]: the delivery hash; KEYS[2]: the due set. ARGV[1]: job id; ARGV[2]: next-attempt time;
-- ARGV[3..]: the delivery's field/value pairs. Returns 1 when recorded.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
