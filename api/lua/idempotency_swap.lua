-- Replace an idempotency key's in-flight reservation, only while the key still holds it (never a
-- key another request has since taken over or completed).
-- KEYS[1]: the key record; ARGV[1]: what it must equal (ARGV[2] = '1'), or (ARGV[2] = '0') the
-- start of the first submitter's in-flight form, "<fingerprint>:<request id>:", followed by the
-- reservation time alone (not taken over); ARGV[3]: the new value ('' = drop the key); ARGV[4]:
-- its time to live in ms. Returns 1 when replaced.
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
if ARGV[2] == '1' then
  if held ~= ARGV[1] then return 0 end
elseif string.sub(held, 1, #ARGV[1]) ~= ARGV[1] or string.find(held, ':', #ARGV[1] + 1, true) then
  return 0
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
return 1
