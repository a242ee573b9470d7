-- reclaim_jobs: running on a silent worker -> running here, for entries idle past the lease.
-- KEYS[1..3] streams high, normal, low
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] count  ARGV[4] now  ARGV[5] key base
-- ARGV[6] lease in milliseconds
-- Returns rows (see take()); deliveries is the entry's delivery count after this claim.
local out = {}
local remaining = tonumber(ARGV[3])
for _, stream in ipairs(KEYS) do
  if remaining <= 0 then break end
  local res = redis.call("XAUTOCLAIM", stream, ARGV[1], ARGV[2], ARGV[6], "0-0",
    "COUNT", remaining)
  for _, e in ipairs(res[2]) do
    local p = redis.call("XPENDING", stream, ARGV[1], e[1], e[1], 1)
    local deliveries = 1
    if p[1] then deliveries = tonumber(p[1][4]) end
    local row = take(ARGV[5], stream, ARGV[1], ARGV[2], e[1], e[2], ARGV[4], deliveries)
    if row then
      out[#out + 1] = row
      remaining = remaining - 1
      redis.call("HINCRBY", ARGV[5] .. ":stats", "reclaimed", 1)
    end
  end
end
return out
