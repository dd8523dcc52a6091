-- consume.lua — take COST units from every counter of one request, or from none.
--
-- Why a script: the check of every counter and the update of every counter must be one atomic step,
-- or two gateways could both see "1 left" and both take it (MULTI cannot branch on values it reads).
-- All keys of one request share a hash tag ({subject}), so the script also runs on Redis Cluster.
--
-- Time is passed in by the gateway (microseconds since the Unix epoch): Lua numbers are doubles,
-- exact for integers below 2^53, which microsecond timestamps are and nanosecond ones are not.
--
-- KEYS[1]        idempotency record (only read/written when ARGV[3] == '1')
-- KEYS[2..n+1]   counters
-- ARGV[1]        now_us
-- ARGV[2]        cost
-- ARGV[3]        '1' to make the decision idempotent under KEYS[1], else '0'
-- ARGV[4]        idempotency record TTL in milliseconds
-- ARGV[5]        grace after a window's reset before its key expires, in milliseconds
-- ARGV[6]        lease fraction in parts per million (0 = no lease)
-- ARGV[7]        largest lease, in units
-- ARGV[8]        smallest lease worth taking, in units (smaller grants are not taken)
-- then for counter i, three values at 9 + 3*(i-1):
--   'b', emission_us, burst      token bucket (GCRA); the key holds the theoretical arrival time
--   'w', limit, reset_at_us      calendar window; the key names the window and holds units used
--
-- Lease: when the request is admitted, the script may also take LEASE more units from every counter
-- (the same number from each, since a gateway can only admit locally when all counters allow it):
-- LEASE = min over counters of min(largest, floor(remaining after cost * fraction)), or 0 when
-- below the smallest worth taking. The lease shrinks as the shared remainder shrinks.
--
-- Returns { allowed, replayed, lease, then per counter: allowed, limit, remaining, reset_after_us,
--           retry_after_us }  (allowed/replayed as 1/0; remaining after cost and lease). A replay
--           returns the first decision.

local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local idem = ARGV[3] == '1'

if idem then
  local first = redis.call('GET', KEYS[1])
  if first then
    local reply = cjson.decode(first)
    reply[2] = 1
    return reply
  end
end

local n = #KEYS - 1
local verdicts = {}
local all = true
for i = 1, n do
  local key = KEYS[i + 1]
  local base = 9 + 3 * (i - 1)
  local kind = ARGV[base]
  local a = tonumber(ARGV[base + 1])
  local b = tonumber(ARGV[base + 2])
  local stored = tonumber(redis.call('GET', key))
  local v = {}
  if kind == 'b' then
    local t, burst = a, b
    local capacity = t * burst
    local tat = math.max(stored or now, now)
    local new_tat = tat + t * cost
    local allow_at = new_tat - capacity
    v.allowed = allow_at <= now
    local after = v.allowed and new_tat or tat
    v.limit = burst
    v.remaining = math.floor(math.max(capacity - (after - now), 0) / t)
    v.reset_after = after - now
    v.retry_after = v.allowed and 0 or (allow_at - now)
    v.next = after
  else
    local limit, reset_at = a, b
    local used = stored or 0
    v.allowed = used + cost <= limit
    local after = v.allowed and (used + cost) or used
    v.limit = limit
    v.remaining = math.max(limit - after, 0)
    v.reset_after = math.max(reset_at - now, 0)
    v.retry_after = v.allowed and 0 or v.reset_after
    v.next = after
    -- Never in the past, even for a clock injected by a test.
    v.expire_at_ms = math.floor(math.max(reset_at, now) / 1000) + tonumber(ARGV[5])
  end
  v.kind = kind
  v.stored = stored
  verdicts[i] = v
  all = all and v.allowed
end

local lease = 0
local ppm, largest, smallest = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if all and ppm > 0 then
  lease = largest
  for i = 1, n do
    lease = math.min(lease, math.floor(verdicts[i].remaining * ppm / 1000000))
  end
  if lease < smallest then
    lease = 0
  end
  for i = 1, n do
    local v = verdicts[i]
    if v.kind == 'b' then
      local t = tonumber(ARGV[9 + 3 * (i - 1) + 1])
      v.next = v.next + lease * t
      v.reset_after = v.next - now
    else
      v.next = v.next + lease
    end
    v.remaining = v.remaining - lease
  end
end

local reply = { all and 1 or 0, 0, lease }
for i = 1, n do
  local v = verdicts[i]
  local key = KEYS[i + 1]
  if all then
    if v.kind == 'b' then
      -- The bucket is full again at `next`: the key is not needed after that.
      redis.call('SET', key, string.format('%.0f', v.next),
        'PX', math.max(math.ceil((v.next - now) / 1000), 1))
    else
      redis.call('SET', key, string.format('%.0f', v.next), 'PXAT', string.format('%.0f', v.expire_at_ms))
    end
  elseif v.allowed then
    -- Refused by another counter: report what this one holds now, not what it would have held.
    if v.kind == 'b' then
      local tat = math.max(v.stored or now, now)
      local t = tonumber(ARGV[9 + 3 * (i - 1) + 1])
      v.remaining = math.floor(math.max(t * v.limit - (tat - now), 0) / t)
      v.reset_after = tat - now
    else
      v.remaining = math.max(v.limit - (v.stored or 0), 0)
    end
  end
  table.insert(reply, v.allowed and 1 or 0)
  table.insert(reply, v.limit)
  table.insert(reply, v.remaining)
  table.insert(reply, v.reset_after)
  table.insert(reply, v.retry_after)
end

if idem then
  redis.call('SET', KEYS[1], cjson.encode(reply), 'PX', tonumber(ARGV[4]))
end
return reply
