-- The batch write script of the release before rollups (raw ticks only), kept as the baseline of
-- `tickctl bench rollups` so one run measures what rollups add. Not used by any store.
-- Writes one asset's ticks from one batch, atomically and idempotently, and announces the new ones.
-- KEYS[1] = sorted set of ticks, KEYS[2] = latest tick (both under the asset's {hash tag})
-- ARGV[1] = max age in µs (0 = keep all), ARGV[2] = max count (0 = keep all),
-- ARGV[3] = live channel (PREFIX:{ASSET}:live), ARGV[4] = the writer's clock in µs,
-- ARGV[5..] = score, member, score, member, ...
-- Returns the number of ticks that were not stored before.
-- The members that were new are published on the live channel as one JSON array, once the batch is
-- applied: a redelivered batch adds nothing and so publishes nothing.
--
-- Cost: per chunk of up to CHUNK ticks, one ZMSCORE (which are stored already?) and one variadic ZADD
-- of the rest, instead of one ZADD call per tick. Needs Redis >= 6.2 (ZMSCORE). Chunks keep every
-- call's argument count far below what Lua's unpack() accepts.
local CHUNK = 1000
local added = 0
local new = {}
local seen = {}
local latest = redis.call('GET', KEYS[2])
local latest_id = latest and string.sub(latest, 1, 39) or nil
local newest = nil
local n = (#ARGV - 4) / 2
for first = 1, n, CHUNK do
  local last = math.min(first + CHUNK - 1, n)
  local members = {}
  for i = first, last do
    members[#members + 1] = ARGV[4 + 2 * i]
  end
  local stored = redis.call('ZMSCORE', KEYS[1], unpack(members))
  local zadd = {}
  for j, member in ipairs(members) do
    -- A missing member's score comes back as false; a tick repeated inside the batch counts once.
    if not stored[j] and not seen[member] then
      seen[member] = true
      zadd[#zadd + 1] = ARGV[3 + 2 * (first + j - 1)]
      zadd[#zadd + 1] = member
      added = added + 1
      new[added] = member
    end
    -- The first 39 characters are zero-padded digits (time, seq): comparing them compares tick ids.
    local id = string.sub(member, 1, 39)
    if latest_id == nil or id > latest_id then
      latest_id = id
      newest = member
    end
  end
  if #zadd > 0 then
    redis.call('ZADD', KEYS[1], unpack(zadd))
  end
end
if newest then
  redis.call('SET', KEYS[2], newest)
end
local max_age = tonumber(ARGV[1])
if max_age > 0 then
  local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if top[2] then
    -- Age counts back from the newest tick, but never from later than the writer's clock: one tick
    -- dated in the future must not push every other tick out of the window.
    local newest_us = math.min(tonumber(top[2]), tonumber(ARGV[4]))
    -- %.0f prints the exact integer; Lua's default number formatting would round it.
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', newest_us - max_age))
  end
end
local max_count = tonumber(ARGV[2])
if max_count > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(max_count + 1))
end
if added > 0 then
  redis.call('PUBLISH', ARGV[3], cjson.encode(new))
end
return added
