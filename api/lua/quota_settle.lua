-- KEYS: spent, reserved, settled marker ('' key name unused when no job id). ARGV: owner, cost,
-- debit (1) or release (0), reserved (1/0), has job id (1/0), marker ttl s. Returns 1 if applied.
if ARGV[5] == '1' then
  if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'EX', ARGV[6]) then return 0 end
end
local cost = tonumber(ARGV[2])
if ARGV[4] == '1' then
  local reserved = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
  local after = reserved - cost
  if after < 0 then after = 0 end
  redis.call('HSET', KEYS[2], ARGV[1], after)
end
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], ARGV[1], cost) end
return 1
