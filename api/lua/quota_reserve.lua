-- KEYS: spent, reserved. ARGV: owner, allowance, cost. Returns {1, left} or {0, left}.
local spent = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local reserved = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local left = tonumber(ARGV[2]) - spent - reserved
local cost = tonumber(ARGV[3])
if left < cost then return {0, left} end
redis.call('HINCRBY', KEYS[2], ARGV[1], cost)
return {1, left - cost}
