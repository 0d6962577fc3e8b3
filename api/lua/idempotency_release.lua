-- Drop an idempotency key only while it still holds this caller's in-flight reservation
-- (never a key another request has since reserved or completed).
-- KEYS[1]: the key record; ARGV[1]: the reservation's value ("<fingerprint>:")
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
