-- Replaces one UTC day of one asset's rollup candles with candles recomputed from its raw ticks, if
-- no write touched that day since the caller read it (compare-and-set on the day's 1d candle and the
-- horizon: any new tick of the day changes the 1d candle's count).
-- KEYS[1] = version, KEYS[2] = horizon, KEYS[3..6] = rollups 1s, 1m, 1h, 1d, KEYS[7] = latest tick
-- ARGV[1] = expected 1d candle member of the day ('' = none), ARGV[2] = expected horizon ('' = none),
-- ARGV[3] = day start in s, ARGV[4] = first bucket start replaced in s (above the horizon),
-- ARGV[5] = day end in s (exclusive), ARGV[6] = the writer's clock in µs,
-- ARGV[7..10] = max age of the 1s, 1m, 1h, 1d rollups in s (0 = keep all),
-- then triples base (1..4), bucket start in s, candle member.
-- Returns the asset's new version, or -1 when the day or the horizon changed (nothing written).
local day = redis.call('ZRANGE', KEYS[6], ARGV[3], ARGV[3], 'BYSCORE')[1] or ''
local horizon = redis.call('GET', KEYS[2]) or ''
if day ~= ARGV[1] or horizon ~= ARGV[2] then
  return -1
end
for b = 1, 4 do
  redis.call('ZREMRANGEBYSCORE', KEYS[2 + b], ARGV[4], '(' .. ARGV[5])
end
for i = 11, #ARGV, 3 do
  redis.call('ZADD', KEYS[2 + tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
-- Rollup retention, as write.lua applies it.
local latest = redis.call('GET', KEYS[7])
if latest then
  local newest_s = math.min(tonumber(string.sub(latest, 1, 10)), math.floor(tonumber(ARGV[6]) / 1000000))
  for b = 1, 4 do
    local age = tonumber(ARGV[6 + b])
    if age > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[2 + b], '-inf', '(' .. string.format('%.0f', newest_s - age))
    end
  end
end
return redis.call('INCR', KEYS[1])
