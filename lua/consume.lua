-- consume.lua — take each counter's cost from every counter of one request, or from none.
--
-- Why a script: the check of every counter and the update of every counter must be one atomic step,
-- or two gateways could both see "1 left" and both take it (MULTI cannot branch on values it reads).
-- All keys of one request share a hash tag ({subject}), so the script also runs on Redis Cluster.
--
-- Time is passed in by the gateway (microseconds since the Unix epoch): Lua numbers are doubles,
-- exact for integers below 2^53, which microsecond timestamps are and nanosecond ones are not.
-- A bucket's emission interval comes to the nanosecond (`1.714`) and its TAT is stored with its
-- fraction (`%.3f`; near 2^51 µs a double keeps quarter microseconds), so fast rates refill at
-- their own pace rather than at a whole microsecond per unit.
--
-- KEYS[1]          idempotency record (only read/written when ARGV[2] is not empty)
-- KEYS[2i], KEYS[2i+1]  counter i and its reservations (a hash: attempt -> "amount:expires_us")
-- ARGV[1]          now_us
-- ARGV[2]          what the request asks for, to make the decision idempotent under KEYS[1]:
--                  a repeat asking for the same replays the first decision, one asking for
--                  something else gets { -1 } (the key was used for another request); '' = not
--                  idempotent
-- ARGV[3]          idempotency record TTL in milliseconds
-- ARGV[4]          grace after a window's reset before its key expires, in milliseconds
-- ARGV[5]          lease fraction in parts per million (0 = no lease)
-- ARGV[6]          largest lease, in requests like this one
-- ARGV[7]          smallest lease worth taking, in requests (smaller grants are not taken)
-- ARGV[8]          reservation attempt id ('' = consume outright)
-- ARGV[9]          reservation expiry, us
-- then for counter i, four values at 10 + 4*(i-1):
--   'b', emission_us, burst, cost      token bucket (GCRA); the key holds the theoretical arrival time
--   'w', limit, reset_at_us, cost      calendar window; the key names the window and holds units used
--
-- Reservations: a window's reserved units are held in its hash, not in its count, so they stop
-- counting when they expire (a gateway that died before settling leaks nothing); expired entries
-- are dropped here. A bucket takes the tokens at once (a bucket refills by itself) and keeps the
-- record only so that settle.lua can refund what was not used.
--
-- Lease: when the request is admitted, the script may also take a lease of LEASE more requests
-- like this one: LEASE times each counter's cost from every counter (a gateway can only admit
-- locally when all counters allow it, and an LLM call costs tokens by the thousand where it costs
-- one request). LEASE = min(largest, min over counters with a cost of floor(remaining after cost
-- * fraction / cost)), or 0 when below the smallest worth taking. It shrinks as the remainder
-- shrinks. A reservation may take a lease too: the lease is consumed outright, the reservation
-- held as usual.
--
-- Returns { allowed, replayed, lease, then per counter: allowed, limit, remaining, reset_after_us,
--           retry_after_us }  (allowed/replayed as 1/0; remaining after cost and lease). A replay
--           returns the first decision.

local now = tonumber(ARGV[1])
local asked = ARGV[2]
local idem = asked ~= ''
local attempt = ARGV[8]
local reserving = attempt ~= ''
local resv_expires = tonumber(ARGV[9])

if idem then
  local first = redis.call('GET', KEYS[1])
  if first then
    local record = cjson.decode(first)
    local reply = record
    -- { a = asked, r = reply }; a bare reply was written before requests were compared.
    if record.r then
      if record.a ~= asked then
        return { -1 }
      end
      reply = record.r
    end
    reply[2] = 1
    return reply
  end
end

-- Units reserved in a window's hash and not yet expired; drops the expired ones.
local function live_reserved(rkey)
  local sum = 0
  local entries = redis.call('HGETALL', rkey)
  for j = 1, #entries, 2 do
    local amount, expires = string.match(entries[j + 1], '(%d+):(%d+)')
    if tonumber(expires) > now then
      sum = sum + tonumber(amount)
    else
      redis.call('HDEL', rkey, entries[j])
    end
  end
  return sum
end

local n = (#KEYS - 1) / 2
local verdicts = {}
local all = true
for i = 1, n do
  local key, rkey = KEYS[2 * i], KEYS[2 * i + 1]
  local base = 10 + 4 * (i - 1)
  local kind = ARGV[base]
  local a, b, cost = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local stored = tonumber(redis.call('GET', key))
  local v = { kind = kind, cost = cost, key = key, rkey = rkey, t = a }
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
    v.now_remaining = math.floor(math.max(capacity - (tat - now), 0) / t)
    v.now_reset_after = tat - now
  else
    local limit, reset_at = a, b
    local own = stored or 0
    local used = own + live_reserved(rkey)
    v.allowed = used + cost <= limit
    v.limit = limit
    v.remaining = math.max(limit - used - (v.allowed and cost or 0), 0)
    v.reset_after = math.max(reset_at - now, 0)
    v.retry_after = v.allowed and 0 or v.reset_after
    v.next = own + ((v.allowed and not reserving) and cost or 0)
    v.now_remaining = math.max(limit - used, 0)
    -- A TTL relative to the gateway's clock, not an absolute PXAT: Redis's own clock then plays
    -- no part (a skewed server, or a clock injected by a test, cannot expire a live window).
    v.ttl_ms = math.ceil((math.max(reset_at, now) - now) / 1000) + tonumber(ARGV[4])
  end
  verdicts[i] = v
  all = all and v.allowed
end

local lease = 0
local ppm, largest, smallest = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if all and ppm > 0 then
  lease = largest
  for i = 1, n do
    local v = verdicts[i]
    if v.cost > 0 then
      lease = math.min(lease, math.floor(v.remaining * ppm / 1000000 / v.cost))
    end
  end
  if lease < smallest then
    lease = 0
  end
  for i = 1, n do
    local v = verdicts[i]
    local units = lease * v.cost
    if v.kind == 'b' then
      v.next = v.next + units * v.t
      v.reset_after = v.next - now
    else
      v.next = v.next + units
    end
    v.remaining = v.remaining - units
  end
end

local reply = { all and 1 or 0, 0, lease }
for i = 1, n do
  local v = verdicts[i]
  if all then
    if v.kind == 'b' then
      -- The bucket is full again at `next`: the key is not needed after that.
      redis.call('SET', v.key, string.format('%.3f', v.next),
        'PX', math.max(math.ceil((v.next - now) / 1000), 1))
    elseif v.next > 0 then
      redis.call('SET', v.key, string.format('%.0f', v.next), 'PX', math.max(v.ttl_ms, 1))
    end
    if reserving then
      if v.kind == 'b' then
        -- Bucket holds only matter for refunds; drop the expired ones so the hash stays small.
        live_reserved(v.rkey)
      end
      redis.call('HSET', v.rkey, attempt, string.format('%.0f:%.0f', v.cost, resv_expires))
      local ttl_ms = math.ceil((resv_expires - now) / 1000) + 60000
      if redis.call('PTTL', v.rkey) < ttl_ms then
        redis.call('PEXPIRE', v.rkey, ttl_ms)
      end
    end
  elseif v.allowed then
    -- Refused by another counter: report what this one holds now, not what it would have held.
    v.remaining = v.now_remaining
    if v.kind == 'b' then
      v.reset_after = v.now_reset_after
    end
  end
  table.insert(reply, v.allowed and 1 or 0)
  table.insert(reply, v.limit)
  table.insert(reply, v.remaining)
  table.insert(reply, v.reset_after)
  table.insert(reply, v.retry_after)
end

if idem then
  redis.call('SET', KEYS[1], cjson.encode({ a = asked, r = reply }), 'PX', tonumber(ARGV[3]))
end
return reply
