-- settle.lua — replace an attempt's reservation with what it really used, once.
--
-- Why a script: the "settled already?" check, the removal of the reservation and the charge must be
-- one step, or a settlement delivered twice (a retried message, two gateways) could charge twice.
-- All keys share the subject's hash tag.
--
-- KEYS[1]               settlement record of this attempt (its presence means: already settled)
-- KEYS[2i], KEYS[2i+1]  counter i and its reservations hash (as in consume.lua)
-- ARGV[1]               now_us
-- ARGV[2]               attempt id
-- ARGV[3]               settlement record TTL in milliseconds
-- ARGV[4]               grace after a window's reset before its key expires, in milliseconds
-- then for counter i, four values at 5 + 4*(i-1):
--   'b', emission_us, burst, actual     bucket: move the arrival time by (actual - reserved) tokens
--   'w', limit, reset_at_us, actual     window: add actual to the count (the reservation is dropped)
--
-- A window reservation that expired before settlement is gone: the actual amount is charged in
-- full. A bucket record that expired refunds nothing (its tokens were taken at reservation time).
--
-- Returns 1 when charged, 0 when this attempt was settled before (nothing changed).

local now = tonumber(ARGV[1])
local attempt = ARGV[2]
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', tonumber(ARGV[3])) then
  return 0
end
local n = (#KEYS - 1) / 2
for i = 1, n do
  local key, rkey = KEYS[2 * i], KEYS[2 * i + 1]
  local base = 5 + 4 * (i - 1)
  local kind = ARGV[base]
  local a, b, actual = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local reserved = 0
  local entry = redis.call('HGET', rkey, attempt)
  if entry then
    local amount, expires = string.match(entry, '(%d+):(%d+)')
    -- An expired hold refunds nothing: it already stopped counting.
    if tonumber(expires) > now then
      reserved = tonumber(amount)
    end
    redis.call('HDEL', rkey, attempt)
  end
  local stored = tonumber(redis.call('GET', key))
  if kind == 'b' then
    local tat = math.max(math.max(stored or now, now) + (actual - reserved) * a, now)
    if tat > now then
      redis.call('SET', key, string.format('%.3f', tat), 'PX', math.max(math.ceil((tat - now) / 1000), 1))
    else
      redis.call('DEL', key)
    end
  elseif actual > 0 then
    -- Relative to the gateway's clock, as in consume.lua: Redis's clock plays no part.
    local ttl_ms = math.ceil((math.max(b, now) - now) / 1000) + tonumber(ARGV[4])
    redis.call('SET', key, string.format('%.0f', (stored or 0) + actual), 'PX', math.max(ttl_ms, 1))
  end
end
return 1
