-- renew.lua — keep a live reservation held longer: a call still in flight renews its hold.
--
-- Why a script: reading the hold and writing it back with a later expiry must not interleave with
-- its settlement (which deletes it) or an expiry sweep, or a settled hold could come back.
-- All keys share the subject's hash tag.
--
-- KEYS[i]   reservations hash of counter i (attempt -> "amount:expires_us", as in consume.lua)
-- ARGV[1]   now_us
-- ARGV[2]   attempt id
-- ARGV[3]   new expiry, us
--
-- A hold that is gone (settled) or already expired is left alone: an expired hold has stopped
-- counting, and bringing it back could refuse requests admitted meanwhile.
-- Returns the number of holds renewed.

local now, attempt, expires = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local renewed = 0
for i = 1, #KEYS do
  local entry = redis.call('HGET', KEYS[i], attempt)
  if entry then
    local amount, until_us = string.match(entry, '(%d+):(%d+)')
    if tonumber(until_us) > now and expires > tonumber(until_us) then
      redis.call('HSET', KEYS[i], attempt, string.format('%s:%.0f', amount, expires))
      local ttl_ms = math.ceil((expires - now) / 1000) + 60000
      if redis.call('PTTL', KEYS[i]) < ttl_ms then
        redis.call('PEXPIRE', KEYS[i], ttl_ms)
      end
      renewed = renewed + 1
    end
  end
end
return renewed
