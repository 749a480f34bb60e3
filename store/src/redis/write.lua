-- Writes one asset's ticks from one batch, atomically and idempotently, and announces the new ones.
-- KEYS[1] = sorted set of ticks, KEYS[2] = latest tick (both under the asset's {hash tag})
-- ARGV[1] = max age in µs (0 = keep all), ARGV[2] = max count (0 = keep all),
-- ARGV[3] = live channel (PREFIX:{ASSET}:live), ARGV[4..] = score, member, score, member, ...
-- Returns the number of ticks that were not stored before.
-- The members that were new (ZADD NX added them) are published on the live channel as one JSON array,
-- once the batch is applied: a redelivered batch adds nothing and so publishes nothing.
local added = 0
local new = {}
local latest = redis.call('GET', KEYS[2])
local latest_id = latest and string.sub(latest, 1, 39) or nil
local newest = nil
for i = 4, #ARGV, 2 do
  local member = ARGV[i + 1]
  if redis.call('ZADD', KEYS[1], 'NX', ARGV[i], member) == 1 then
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
if newest then
  redis.call('SET', KEYS[2], newest)
end
local max_age = tonumber(ARGV[1])
if max_age > 0 then
  local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if top[2] then
    -- %.0f prints the exact integer; Lua's default number formatting would round it.
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', tonumber(top[2]) - max_age))
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
