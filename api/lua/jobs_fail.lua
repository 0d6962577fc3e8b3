-- ARGV[5..]: id, error, metrics json ('' = keep), attempt fence ('' = any holder).
-- Returns {1, 'FAILED'}, {0, status} when terminal or fenced off, {-1, ''} when unknown.
local id = ARGV[5]
local k = jkey(id)
local rec = redis.call('HMGET', k, 'status', 'attempts')
if not rec[1] then return {-1, ''} end
if rec[1] == 'COMPLETED' or rec[1] == 'FAILED' then return {0, rec[1]} end
if ARGV[8] ~= '' and (rec[1] ~= 'PROCESSING' or rec[2] ~= ARGV[8]) then return {0, rec[1]} end
if ARGV[7] ~= '' then redis.call('HSET', k, 'metrics', ARGV[7]) end
fail_with(id, ARGV[6])
return {1, 'FAILED'}
