-- ARGV[5..]: id, cancel error. Returns 1 (queued: failed now), 2 (running: flagged), 0 (terminal), -1.
local id = ARGV[5]
local k = jkey(id)
local status = redis.call('HGET', k, 'status')
if not status then return -1 end
if status == 'QUEUED' then
  redis.call('HSET', k, 'cancel_requested', '1')
  fail_with(id, ARGV[6])
  return 1
end
if status == 'PROCESSING' then
  redis.call('HSET', k, 'cancel_requested', '1')
  redis.call('PUBLISH', P .. ':cancel:' .. id, '1')
  return 2
end
return 0
