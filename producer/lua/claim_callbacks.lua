-- claim_callbacks: completion callbacks whose sender never confirmed them (it died, or the
-- broker was down) -> this worker sends them again, in one step per batch: each claimed one
-- is re-armed for later (so two workers never claim it at once) and returned with what it
-- needs. Entries whose job record is gone (expired) are dropped.
-- KEYS[1] callback outbox (sorted set)
-- ARGV[1] now (unix seconds)  ARGV[2] when to offer the claimed ones again  ARGV[3] at most
-- ARGV[4] key base "slotfill:{q}"
-- Returns {job id, callback JSON, result JSON, ...}
local out = {}
local due = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[1], "LIMIT", 0, ARGV[3])
for _, id in ipairs(due) do
  local h = redis.call("HMGET", ARGV[4] .. ":job:" .. id, "callback", "result")
  if h[1] and h[2] then
    redis.call("ZADD", KEYS[1], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = h[1]
    out[#out + 1] = h[2]
  else
    redis.call("ZREM", KEYS[1], id)
  end
end
return out
