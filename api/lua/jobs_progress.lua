-- ARGV[5..]: id, step, total ('' = none). Returns 1 if recorded.
local k = jkey(ARGV[5])
if redis.call('HGET', k, 'status') ~= 'PROCESSING' then return 0 end
redis.call('HSET', k, 'progress_step', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', k, 'progress_total', ARGV[7]) else redis.call('HDEL', k, 'progress_total') end
return 1
