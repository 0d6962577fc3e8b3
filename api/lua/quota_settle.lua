-- KEYS: spent, reserved, settled marker ('' key name unused when no job id). ARGV: owner, cost,
-- debit (1) or release (0), has job id (1/0), marker ttl s. Returns 1 if applied. The reservation
-- is given back in both cases (never below zero: a lost reservation is charged all the same).
if ARGV[4] == '1' then
  if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'EX', ARGV[5]) then return 0 end
end
local cost = tonumber(ARGV[2])
local reserved = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local after = reserved - cost
if after < 0 then after = 0 end
redis.call('HSET', KEYS[2], ARGV[1], after)
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], ARGV[1], cost) end
return 1
