--- @include "includes/claim"
-- start_jobs: queued -> running, for up to ARGV[3] jobs, highest priority stream first.
-- KEYS[1..3] streams high, normal, low
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] count  ARGV[4] now  ARGV[5] key base "slotfill:{q}"
-- Returns claims (see take()), each with disposition "run", "cancelled", "expired" or
-- "malformed".
local out = {}
local remaining = tonumber(ARGV[3])
-- A stream is read again while entries it gave were dropped (duplicate ids, finished jobs):
-- dropped entries never let a lower stream's jobs start before this one's.
local MAX_READS = 100
for _, stream in ipairs(KEYS) do
  local reads = 0
  while remaining > 0 and reads < MAX_READS do
    reads = reads + 1
    local res = redis.call("XREADGROUP", "GROUP", ARGV[1], ARGV[2], "COUNT", remaining,
      "STREAMS", stream, ">")
    if not res or #res[1][2] == 0 then break end
    local got = #res[1][2]
    local wanted = remaining
    for _, e in ipairs(res[1][2]) do
      local row = take(ARGV[5], stream, ARGV[1], ARGV[2], e[1], e[2], ARGV[4], 1, "run")
      if row then
        out[#out + 1] = row
        remaining = remaining - 1
      end
    end
    if got < wanted then break end  -- the stream is drained
  end
end
return out
