-- replay_dead_letter: dead-lettered -> queued again: the entry's body goes back on its stream
-- as a fresh entry for the same job id, the job's failed result is dropped, and the dead
-- letter leaves the dead-letter stream, in one step (never both queued and dead, never lost).
-- KEYS[1] dead stream  KEYS[2] job hash  KEYS[3] done list  KEYS[4] the entry's stream
-- KEYS[5] stats hash  KEYS[6..8] the queue's three streams (high, normal, low), for the cap
-- KEYS[9] the job's token stream (the failed run's output and ``end``: dropped, so a reader
-- of the replayed job follows the new run only)
-- ARGV[1] dead entry id  ARGV[2] job id (the dead letter's, or a new one for an entry that
-- had none)  ARGV[3] now  ARGV[4] max pending jobs  ARGV[5] priority name
-- Returns {"ok", job id, new entry id} | {"missing", ""} (no such dead letter)
-- | {"mismatch", what} (the dead letter is not what KEYS/ARGV say) | {"active", status}
-- (the job is queued or running again) | {"full", pending count}
local found = redis.call("XRANGE", KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return {"missing", ""} end
local f = {}
local flat = found[1][2]
for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
if f["stream"] ~= KEYS[4] then return {"mismatch", f["stream"] or ""} end
local job = f["job"] or ""
if job ~= "" and job ~= ARGV[2] then return {"mismatch", job} end
local st = redis.call("HGET", KEYS[2], "status")
if st == "queued" or st == "running" then return {"active", st} end
local pending = redis.call("XLEN", KEYS[6]) + redis.call("XLEN", KEYS[7]) + redis.call("XLEN", KEYS[8])
if pending >= tonumber(ARGV[4]) then return {"full", tostring(pending)} end
local deadline = redis.call("HGET", KEYS[2], "deadline")
local entry = redis.call("XADD", KEYS[4], "*", "id", ARGV[2], "body", f["body"] or "")
redis.call("DEL", KEYS[2], KEYS[3], KEYS[9])
redis.call("HSET", KEYS[2], "status", "queued", "queued_at", ARGV[3], "stream", KEYS[4],
  "entry", entry, "priority", ARGV[5], "attempts", 0, "replayed_from", ARGV[1])
if deadline then redis.call("HSET", KEYS[2], "deadline", deadline) end
redis.call("XDEL", KEYS[1], ARGV[1])
redis.call("HINCRBY", KEYS[5], "dead_replayed", 1)
return {"ok", ARGV[2], entry}
