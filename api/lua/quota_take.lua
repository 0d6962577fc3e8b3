-- KEYS: bucket. ARGV: capacity (per minute). Returns {allowed 1/0, ms until the next token}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = capacity / 60
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, last = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, last = capacity, now end
tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
local allowed, wait_ms = 0, 0
if tokens >= 1 then
  tokens, allowed = tokens - 1, 1
else
  wait_ms = math.max(1, math.ceil((1 - tokens) / rate * 1000))
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], 61000)
return {allowed, wait_ms}
