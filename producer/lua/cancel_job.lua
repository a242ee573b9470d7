-- cancel_job: queued -> cancelled at once; running -> cancel requested (the worker aborts it).
-- KEYS[1] job hash  KEYS[2] done list  KEYS[3] control channel (sharded Pub/Sub)  KEYS[4] token stream
-- ARGV[1] job id  ARGV[2] result JSON for a queued job  ARGV[3] now  ARGV[4] result TTL
-- Returns "cancelled" | "requested" | "finished" (already terminal) | "unknown"
local st = redis.call("HGET", KEYS[1], "status")
if not st then return "unknown" end
if st == "queued" then
  local stream = redis.call("HGET", KEYS[1], "stream")
  local entry = redis.call("HGET", KEYS[1], "entry")
  -- Queued means no worker has read the entry yet (start_jobs marks running atomically).
  if stream and entry then redis.call("XDEL", stream, entry) end
  redis.call("HSET", KEYS[1], "status", "cancelled", "result", ARGV[2], "finished_at", ARGV[3])
  redis.call("EXPIRE", KEYS[1], ARGV[4])
  redis.call("RPUSH", KEYS[2], "cancelled")
  redis.call("EXPIRE", KEYS[2], ARGV[4])
  if redis.call("HGET", KEYS[1], "streaming") then
    redis.call("XADD", KEYS[4], "*", "type", "end", "status", "cancelled")
    redis.call("EXPIRE", KEYS[4], ARGV[4])
  end
  return "cancelled"
end
if st == "running" then
  redis.call("HSET", KEYS[1], "cancel_requested", ARGV[3])
  redis.call("SPUBLISH", KEYS[3], ARGV[1])  -- sharded: stays on the queue's slot in a cluster
  return "requested"
end
return "finished"
