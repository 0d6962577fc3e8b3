-- KEYS: the streams of the served slugs, every priority. ARGV[5..]: consumer, min idle ms, max attempts.
-- Returns {'job', stream, entry, flat record} or {'none', last generated id of each stream}.
local consumer, min_idle, max_attempts = ARGV[5], ARGV[6], tonumber(ARGV[7])
local function field(flat, name)
  for j = 1, #flat, 2 do if flat[j] == name then return flat[j + 1] end end
end
-- Start one delivery of an entry; nil when the entry was stale or its job ended here.
local function start(stream, entry, id)
  local k = jkey(id)
  local rec = redis.call('HMGET', k, 'status', 'attempts', 'cancel_requested')
  if not rec[1] or rec[1] == 'COMPLETED' or rec[1] == 'FAILED' then
    drop_entry(stream, entry)
    return nil
  end
  local attempts = tonumber(rec[2]) or 0
  if rec[3] == '1' then
    fail_with(id, ARGV[8])
    return nil
  end
  if attempts >= max_attempts then
    fail_with(id, 'gave up after ' .. attempts .. ' deliveries (request_max_attempts=' .. max_attempts ..
              '): each worker that took this job stopped heartbeating (crashed, killed or cut off) before it finished')
    return nil
  end
  redis.call('HSET', k, 'status', 'PROCESSING', 'attempts', attempts + 1, 'started_at', NOW, 'worker', consumer)
  redis.call('HDEL', k, 'progress_step', 'progress_total')
  redis.call('ZREM', P .. ':queued', id)
  redis.call('SADD', P .. ':processing', id)
  return {'job', stream, entry, redis.call('HGETALL', k)}
end

-- 1. Jobs of silent workers first: they are older than anything undelivered.
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    local cursor = '0-0'
    for _ = 1, 16 do
      local r = redis.call('XAUTOCLAIM', stream, GROUP, consumer, min_idle, cursor, 'COUNT', 1)
      cursor = r[1]
      for _, e in ipairs(r[2]) do
        local got = start(stream, e[1], field(e[2], 'job'))
        if got then return got end
      end
      if cursor == '0-0' then break end
    end
  end
end

-- 2. The first undelivered entry in claim order across the served streams (one stream per slug and
-- priority, each in submission order, so the best head is the best entry): the smallest rank, ties
-- by job id, as the queued index orders them.
for _ = 1, 64 do
  local best, best_rank, best_id = nil, nil, nil
  for _, stream in ipairs(KEYS) do
    if redis.call('EXISTS', stream) == 1 then
      local last = '0-0'
      for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
        if field(g, 'name') == GROUP then last = field(g, 'last-delivered-id') end
      end
      local nxt = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
      if #nxt > 0 then
        local id = field(nxt[1][2], 'job')
        -- A record gone (expired) ranks first, so start() drops its entry at once.
        local rank = tonumber(redis.call('HGET', jkey(id), 'rank') or '-1e300')
        if best == nil or rank < best_rank or (rank == best_rank and id < best_id) then
          best, best_rank, best_id = stream, rank, id
        end
      end
    end
  end
  if best == nil then break end
  local r = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', 1, 'STREAMS', best, '>')
  local e = r[1][2][1]
  local got = start(best, e[1], field(e[2], 'job'))
  if got then return got end
end

local last_ids = {'none'}
for _, stream in ipairs(KEYS) do
  local id = '0-0'
  if redis.call('EXISTS', stream) == 1 then id = field(redis.call('XINFO', 'STREAM', stream), 'last-generated-id') end
  table.insert(last_ids, id)
end
return last_ids
