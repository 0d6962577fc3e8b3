-- Shared by every job script (api/redis_jobs.py prepends it). Every script gets ARGV[1] = key
-- namespace, ARGV[2] = group, ARGV[3] = now (epoch s, the store's clock), ARGV[4] = retention in
-- ms; its own arguments follow. Keys are derived from the namespace inside the scripts; the
-- namespace is a hash tag ({diffserve}), so on a Redis Cluster every key still lives in one slot.
local P, GROUP, NOW, RETENTION_MS = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local function jkey(id) return P .. ':job:' .. id end
-- The ids of a slug's queued and running jobs at every priority (KEDA's worker demand, SCARD).
local function demand_key(slug) return P .. ':demand:' .. slug end
local function drop_entry(stream, entry)
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
end
-- Everything that reaching COMPLETED or FAILED means, in one place.
local function settle(id, status)
  local k = jkey(id)
  local where = redis.call('HMGET', k, 'stream', 'entry', 'slug')
  if where[1] and where[2] then drop_entry(where[1], where[2]) end
  if where[3] then redis.call('SREM', demand_key(where[3]), id) end
  redis.call('ZREM', P .. ':queued', id)
  redis.call('SREM', P .. ':processing', id)
  redis.call('DEL', P .. ':in:' .. id)
  local expires = tonumber(NOW) + RETENTION_MS / 1000
  redis.call('HSET', k, 'status', status, 'finished_at', NOW, 'expires_at', string.format('%.6f', expires))
  redis.call('PEXPIRE', k, RETENTION_MS)
  redis.call('PEXPIRE', P .. ':out:' .. id, RETENTION_MS)
  redis.call('ZADD', P .. ':finished:' .. status, expires, id)
  redis.call('PUBLISH', P .. ':events:' .. id, status)
end
local function fail_with(id, err)
  redis.call('HSET', jkey(id), 'error', err)
  settle(id, 'FAILED')
end
