-- Phase 1 of a batch write, read only: which of one asset's ticks are new, the rollup candles those
-- ticks fall into, and the asset's write version. Rust then computes the new candles exactly
-- (rust_decimal; Lua numbers are doubles) and write.lua stores ticks and candles only if the version is
-- still this one (compare-and-set). Needed when the writer does not know the asset's state from its own
-- last write (first batch, another writer, a redelivery, a late tick into an older bucket).
-- KEYS[1] = sorted set of ticks, KEYS[2] = version, KEYS[3] = horizon (newest id retention removed),
-- KEYS[4..7] = rollups 1s, 1m, 1h, 1d (all under the asset's {hash tag})
-- ARGV = the batch's members
-- Returns {version ('0' when none), flags (1 = new, 0 = stored, repeated or at/below the horizon),
--          bases (1..4), candle members} (bases[i] is the base of candle i).
local CHUNK = 1000
local version = redis.call('GET', KEYS[2]) or '0'
local horizon = redis.call('GET', KEYS[3])
local widths = {1, 60, 3600, 86400}
local flags = {}
local seen = {}
local seconds = {}
local n = #ARGV
for first = 1, n, CHUNK do
  local last = math.min(first + CHUNK - 1, n)
  local members = {}
  for i = first, last do
    members[#members + 1] = ARGV[i]
  end
  local stored = redis.call('ZMSCORE', KEYS[1], unpack(members))
  for j, member in ipairs(members) do
    -- The first 39 characters are zero-padded digits (time, seq): comparing them compares tick ids.
    local id = string.sub(member, 1, 39)
    if not stored[j] and not seen[member] and (not horizon or id > horizon) then
      seen[member] = true
      flags[#flags + 1] = 1
      -- The first 10 digits of the 19-digit ns time are whole seconds: exact in a double.
      seconds[tonumber(string.sub(member, 1, 10))] = true
    else
      flags[#flags + 1] = 0
    end
  end
end
local buckets = {{}, {}, {}, {}}
for secs in pairs(seconds) do
  for b = 1, 4 do
    buckets[b][secs - secs % widths[b]] = true
  end
end
local bases = {}
local candles = {}
for b = 1, 4 do
  for start in pairs(buckets[b]) do
    local found = redis.call('ZRANGE', KEYS[3 + b], start, start, 'BYSCORE')
    if found[1] then
      bases[#bases + 1] = b
      candles[#candles + 1] = found[1]
    end
  end
end
return {version, flags, bases, candles}
