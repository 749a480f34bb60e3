-- One page of an asset's ticks in [from, to) after an optional cursor, in tick-id order.
-- KEYS[1] = sorted set of ticks
-- ARGV[1], ARGV[2] = score bounds (µs, inclusive) that cover the range,
-- ARGV[3] = 19-digit time lower bound (inclusive), ARGV[4] = 19-digit time upper bound (exclusive),
-- ARGV[5] = 39-digit id to continue after, or '' , ARGV[6] = how many members to return.
-- Scores are µs, ids ns: members in the boundary microseconds are filtered here by their exact prefix.
local want = tonumber(ARGV[6])
local out = {}
local offset = 0
local chunk = want + 32
while #out < want do
  local members = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'BYSCORE', 'LIMIT', offset, chunk)
  for _, m in ipairs(members) do
    local t = string.sub(m, 1, 19)
    if t >= ARGV[3] and t < ARGV[4] and (ARGV[5] == '' or string.sub(m, 1, 39) > ARGV[5]) then
      out[#out + 1] = m
      if #out == want then break end
    end
  end
  if #members < chunk then break end
  offset = offset + #members
end
return out
