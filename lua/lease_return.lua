-- lease_return.lua — give back the unused units of leases a gateway took with consume.lua.
--
-- Why a script: the read-adjust-write of each counter must not interleave with other gateways'
-- consumes. Only counters that still exist are adjusted: a window whose key expired, or a bucket
-- already full again, has nothing to give back to. All keys share the subject's hash tag.
--
-- KEYS[1..n]     counters (exact keys the lease was taken from, window date included)
-- ARGV[1]        now_us
-- then for counter i, three values at 2 + 3*(i-1):
--   'b', units, emission_us      bucket: move the theoretical arrival time back by units * emission
--   'w', units, 0                window: subtract units from the count
--
-- Returns the number of counters adjusted.

local now = tonumber(ARGV[1])
local adjusted = 0
for i = 1, #KEYS do
  local base = 2 + 3 * (i - 1)
  local kind, units, t = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local stored = tonumber(redis.call('GET', KEYS[i]))
  if stored then
    if kind == 'b' then
      local tat = math.max(stored - units * t, now)
      if tat > now then
        redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.max(math.ceil((tat - now) / 1000), 1))
      else
        redis.call('DEL', KEYS[i])
      end
    else
      redis.call('SET', KEYS[i], string.format('%.0f', math.max(stored - units, 0)), 'KEEPTTL')
    end
    adjusted = adjusted + 1
  end
end
return adjusted
