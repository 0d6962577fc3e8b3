-- KEYS: seq counter, job, stream, queued index, inputs. ARGV[5..]: id, slug, params, owner,
-- want_base64, output_format, then input name/bytes pairs.
local id = ARGV[5]
local seq = redis.call('INCR', KEYS[1])
redis.pcall('XGROUP', 'CREATE', KEYS[3], GROUP, '0', 'MKSTREAM')  -- BUSYGROUP after the first job
local entry = redis.call('XADD', KEYS[3], '*', 'job', id)
redis.call('HSET', KEYS[2], 'id', id, 'slug', ARGV[6], 'params', ARGV[7], 'status', 'QUEUED',
           'created_at', NOW, 'want_base64', ARGV[9], 'output_format', ARGV[10], 'attempts', '0',
           'cancel_requested', '0', 'seq', seq, 'stream', KEYS[3], 'entry', entry)
if ARGV[8] ~= '' then redis.call('HSET', KEYS[2], 'owner', ARGV[8]) end
redis.call('ZADD', KEYS[4], seq, id)
if #ARGV > 10 then redis.call('HSET', KEYS[5], unpack(ARGV, 11)) end
return entry
