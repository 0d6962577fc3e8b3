-- KEYS: seq counter, job, stream (of the job's slug and priority), queued index, inputs.
-- ARGV[5..]: id, slug, params, owner, want_base64, output_format, priority, aging ms, then input
-- name/bytes pairs. The claim rank (diffserve.api.jobs.claim_rank) is computed on the server's clock (the
-- stream entry's milliseconds), the same for every replica; the sequence number orders jobs of one
-- millisecond. The queued index is scored by it, so positions are the order claim takes jobs in.
-- Returns false (nothing written) when a job with this id exists already.
local id = ARGV[5]
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local seq = redis.call('INCR', KEYS[1])
redis.pcall('XGROUP', 'CREATE', KEYS[3], GROUP, '0', 'MKSTREAM')  -- BUSYGROUP after the first job
local entry = redis.call('XADD', KEYS[3], '*', 'job', id)
local ms = tonumber(string.match(entry, '^(%d+)-'))
local rank = (ms - tonumber(ARGV[11]) * tonumber(ARGV[12])) * 1024 + seq % 1024
redis.call('HSET', KEYS[2], 'id', id, 'slug', ARGV[6], 'params', ARGV[7], 'status', 'QUEUED',
           'created_at', NOW, 'want_base64', ARGV[9], 'output_format', ARGV[10], 'attempts', '0',
           'cancel_requested', '0', 'seq', seq, 'stream', KEYS[3], 'entry', entry, 'priority', ARGV[11],
           'rank', string.format('%d', rank))
if ARGV[8] ~= '' then redis.call('HSET', KEYS[2], 'owner', ARGV[8]) end
redis.call('ZADD', KEYS[4], rank, id)
redis.call('SADD', demand_key(ARGV[6]), id)
if #ARGV > 12 then redis.call('HSET', KEYS[5], unpack(ARGV, 13)) end
return entry
