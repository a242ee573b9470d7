--- @include "includes/terminal"
-- finish_job: running -> succeeded | failed | cancelled | expired, exactly once.
-- KEYS[1] stream  KEYS[2] job hash  KEYS[3] done list  KEYS[4] stats hash  KEYS[5] dead stream
-- ARGV[1] entry id  ARGV[2] group  ARGV[3] status  ARGV[4] result JSON  ARGV[5] now
-- ARGV[6] result TTL seconds  ARGV[7] dead-letter reason ("" = none)  ARGV[8] entry body
-- ARGV[9] delivery count  KEYS[6] token stream (its ``end`` entry, for a streaming job)
-- Returns 1 when this call published the result, 0 when a result already existed (duplicate).
local st = redis.call("HGET", KEYS[2], "status")
if is_terminal(st) then
  redis.call("XACK", KEYS[1], ARGV[2], ARGV[1])
  redis.call("XDEL", KEYS[1], ARGV[1])
  redis.call("HINCRBY", KEYS[4], "duplicates_suppressed", 1)
  return 0
end
redis.call("HSET", KEYS[2], "status", ARGV[3], "result", ARGV[4], "finished_at", ARGV[5])
redis.call("HDEL", KEYS[2], "cancel_requested", "solo_run")
redis.call("EXPIRE", KEYS[2], ARGV[6])
redis.call("RPUSH", KEYS[3], ARGV[3])
redis.call("EXPIRE", KEYS[3], ARGV[6])
redis.call("XACK", KEYS[1], ARGV[2], ARGV[1])
redis.call("XDEL", KEYS[1], ARGV[1])
redis.call("HINCRBY", KEYS[4], "finished_" .. ARGV[3], 1)
if redis.call("HGET", KEYS[2], "streaming") then
  redis.call("XADD", KEYS[6], "*", "type", "end", "status", ARGV[3])
  redis.call("EXPIRE", KEYS[6], ARGV[6])
end
if ARGV[7] ~= "" then
  local h = redis.call("HMGET", KEYS[2], "history", "attempts", "solo_losses")
  redis.call("XADD", KEYS[5], "*", "stream", KEYS[1], "entry", ARGV[1], "reason", ARGV[7],
    "deliveries", ARGV[9], "job", string.match(KEYS[2], ":job:(.*)$"), "body", ARGV[8], "at", ARGV[5],
    "attempts", h[2] or "0", "solo_losses", h[3] or "0", "history", h[1] or "[]")
  redis.call("HINCRBY", KEYS[4], "dead_lettered", 1)
end
return 1
