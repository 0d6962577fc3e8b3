-- KEYS: stream. ARGV[5..]: consumer, entry, attempt, job id. Returns {owned, cancel_requested}.
local rec = redis.call('HMGET', jkey(ARGV[8]), 'status', 'attempts', 'cancel_requested')
local cancel = 0
if rec[3] == '1' then cancel = 1 end
if rec[1] ~= 'PROCESSING' or rec[2] ~= ARGV[7] then return {0, cancel} end
local p = redis.call('XPENDING', KEYS[1], GROUP, ARGV[6], ARGV[6], 1)
if #p == 0 or p[1][2] ~= ARGV[5] then return {0, cancel} end
redis.call('XCLAIM', KEYS[1], GROUP, ARGV[5], 0, ARGV[6], 'JUSTID')
return {1, cancel}
