-- ARGV[5..]: id, outputs json, metrics json, seed ('' = none), then the output blobs.
-- Returns {1, 'COMPLETED'} for the winner, {0, status} when the job was no longer PROCESSING.
local id = ARGV[5]
local k = jkey(id)
local status = redis.call('HGET', k, 'status')
if status ~= 'PROCESSING' then return {0, status or ''} end
local out = P .. ':out:' .. id
redis.call('DEL', out)
for i = 9, #ARGV do redis.call('HSET', out, tostring(i - 9), ARGV[i]) end
redis.call('HSET', k, 'outputs', ARGV[6], 'metrics', ARGV[7])
redis.call('HDEL', k, 'error')
if ARGV[8] ~= '' then redis.call('HSET', k, 'seed', ARGV[8]) else redis.call('HDEL', k, 'seed') end
settle(id, 'COMPLETED')
return {1, 'COMPLETED'}
