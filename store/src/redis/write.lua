-- Stores one asset's new ticks and the rollup candles they change, atomically, applies retention, and
-- announces the new ticks: only if everything the caller assumed still holds, else it writes nothing.
-- The caller computed the candles in Rust (exact decimals; Lua numbers are doubles) from the version,
-- the candles and the newness it assumed; the checks make that a compare-and-set:
--   * the asset's version is ARGV[1] (every script that changes the asset's ticks, horizon or rollups
--     bumps it, so the candles the caller started from are the stored ones);
--   * every tick sent is new: not stored and above the horizon (the caller removed repeats);
--   * every bucket the caller took for empty has no candle.
-- The caller knows these from prepare.lua, or, for the next batch of an asset it wrote last, from its
-- own last write (one round trip instead of two in the steady state).
-- KEYS[1] = sorted set of ticks, KEYS[2] = latest tick, KEYS[3] = version, KEYS[4] = horizon,
-- KEYS[5..8] = rollups 1s, 1m, 1h, 1d (all under the asset's {hash tag})
-- ARGV[1] = expected version, ARGV[2] = max age in µs (0 = keep all), ARGV[3] = max count (0 = keep all),
-- ARGV[4] = live channel (PREFIX:{ASSET}:live), ARGV[5] = the writer's clock in µs,
-- ARGV[6..9] = max age of the 1s, 1m, 1h, 1d rollups in s (0 = keep all), ARGV[10] = N ticks,
-- ARGV[11] = E empty buckets, then N pairs score, member, then E pairs base (1..4), bucket start in s,
-- then triples base, bucket start in s, candle member (the candles those ticks change).
-- Returns the asset's new version, or -1 when an assumption failed (nothing written: the caller
-- reads with prepare.lua and tries again).
-- New ticks are published on the live channel as {"v": new version, "m": [members]}.
local CHUNK = 1000
local version = redis.call('GET', KEYS[3]) or '0'
if version ~= ARGV[1] then
  return -1
end
local n = tonumber(ARGV[10])
local e = tonumber(ARGV[11])
local horizon = redis.call('GET', KEYS[4])
for first = 1, n, CHUNK do
  local last = math.min(first + CHUNK - 1, n)
  local members = {}
  for i = first, last do
    local member = ARGV[11 + 2 * i]
    -- The first 39 characters are zero-padded digits (time, seq): comparing them compares tick ids.
    if horizon and string.sub(member, 1, 39) <= horizon then
      return -1
    end
    members[#members + 1] = member
  end
  local stored = redis.call('ZMSCORE', KEYS[1], unpack(members))
  for j = 1, #members do
    if stored[j] then
      return -1
    end
  end
end
local at = 12 + 2 * n
for i = at, at + 2 * e - 1, 2 do
  if redis.call('ZRANGE', KEYS[4 + tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 1], 'BYSCORE')[1] then
    return -1
  end
end
local latest = redis.call('GET', KEYS[2])
local latest_id = latest and string.sub(latest, 1, 39) or nil
local newest = nil
local new = {}
for first = 1, n, CHUNK do
  local last = math.min(first + CHUNK - 1, n)
  local zadd = {}
  for i = first, last do
    local member = ARGV[11 + 2 * i]
    zadd[#zadd + 1] = ARGV[10 + 2 * i]
    zadd[#zadd + 1] = member
    new[#new + 1] = member
    local id = string.sub(member, 1, 39)
    if latest_id == nil or id > latest_id then
      latest_id = id
      newest = member
    end
  end
  redis.call('ZADD', KEYS[1], unpack(zadd))
end
if newest then
  redis.call('SET', KEYS[2], newest)
end
for i = at + 2 * e, #ARGV, 3 do
  local key = KEYS[4 + tonumber(ARGV[i])]
  redis.call('ZREMRANGEBYSCORE', key, ARGV[i + 1], ARGV[i + 1])
  redis.call('ZADD', key, ARGV[i + 1], ARGV[i + 2])
end
-- Raw retention; the horizon moves up to the newest tick it removes.
local function forget(removed)
  if removed then
    local id = string.sub(removed, 1, 39)
    local h = redis.call('GET', KEYS[4])
    if not h or id > h then
      redis.call('SET', KEYS[4], id)
    end
  end
end
local max_age = tonumber(ARGV[2])
if max_age > 0 then
  local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if top[2] then
    -- Age counts back from the newest tick, but never from later than the writer's clock: one tick
    -- dated in the future must not push every other tick out of the window.
    local newest_us = math.min(tonumber(top[2]), tonumber(ARGV[5]))
    -- %.0f prints the exact integer; Lua's default number formatting would round it.
    local cutoff = '(' .. string.format('%.0f', newest_us - max_age)
    forget(redis.call('ZRANGE', KEYS[1], cutoff, '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, 1)[1])
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  end
end
local max_count = tonumber(ARGV[3])
if max_count > 0 then
  forget(redis.call('ZRANGE', KEYS[1], -(max_count + 1), -(max_count + 1))[1])
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(max_count + 1))
end
-- Rollup retention, counted like raw retention from the newest tick bounded by the clock (whole s).
if latest_id then
  local newest_s = math.min(tonumber(string.sub(latest_id, 1, 10)), math.floor(tonumber(ARGV[5]) / 1000000))
  for b = 1, 4 do
    local age = tonumber(ARGV[5 + b])
    if age > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[4 + b], '-inf', '(' .. string.format('%.0f', newest_s - age))
    end
  end
end
local v = redis.call('INCR', KEYS[3])
if n > 0 then
  redis.call('PUBLISH', ARGV[4], '{"v":' .. v .. ',"m":' .. cjson.encode(new) .. '}')
end
return v
