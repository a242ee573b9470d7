-- submit_job: (nothing) -> queued.
-- KEYS[1] target stream (the job's priority)   KEYS[2] job hash   KEYS[3] idempotency key
-- KEYS[4..6] the queue's three streams (high, normal, low), counted against the cap
-- ARGV[1] job id   ARGV[2] body (JSON)   ARGV[3] now (unix seconds)   ARGV[4] max pending jobs
-- ARGV[5] idempotency key TTL seconds ("" = no idempotency key)   ARGV[6] deadline ("" = none)
-- ARGV[7] priority name  ARGV[8] "1" when the job streams its output, else ""
-- Returns {"ok", job id} | {"exists", job id} | {"full", pending count}
if ARGV[5] ~= "" then
  local existing = redis.call("GET", KEYS[3])
  if existing then return {"exists", existing} end
end
local pending = redis.call("XLEN", KEYS[4]) + redis.call("XLEN", KEYS[5]) + redis.call("XLEN", KEYS[6])
if pending >= tonumber(ARGV[4]) then return {"full", tostring(pending)} end
local entry = redis.call("XADD", KEYS[1], "*", "id", ARGV[1], "body", ARGV[2])
redis.call("HSET", KEYS[2], "status", "queued", "queued_at", ARGV[3], "stream", KEYS[1],
  "entry", entry, "priority", ARGV[7], "attempts", 0)
if ARGV[6] ~= "" then redis.call("HSET", KEYS[2], "deadline", ARGV[6]) end
if ARGV[8] == "1" then redis.call("HSET", KEYS[2], "streaming", "1") end
if ARGV[5] ~= "" then redis.call("SET", KEYS[3], ARGV[1], "EX", ARGV[5]) end
return {"ok", ARGV[1]}
