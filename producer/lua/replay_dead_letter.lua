-- replay_dead_letter: dead-lettered -> queued again: the entry's body goes back on its stream
-- as a fresh entry for the same job id, the job's failed result is dropped, and the dead
-- letter leaves the dead-letter stream, in one step (never both queued and dead, never lost).
-- A refused call writes nothing and replies "ERR slotfill:<code> <what>" (invalid_argument,
-- invalid_key).
-- KEYS[1] slotfill:{Q}:dead  KEYS[2] slotfill:{Q}:job:<id>  KEYS[3] slotfill:{Q}:done:<id>
-- KEYS[4] the dead letter's stream, slotfill:{Q}:stream:<priority>  KEYS[5] slotfill:{Q}:stats
-- KEYS[6..8] slotfill:{Q}:stream:high, ...:normal, ...:low (counted against the cap)
-- KEYS[9] slotfill:{Q}:tokens:<id> (the failed run's output and ``end``: dropped, so a reader
-- of the replayed job follows the new run only)   KEYS[10] slotfill:{Q}:config (max_pending)
-- ARGV[1] dead entry id (<ms>-<seq>)  ARGV[2] job id (the dead letter's, or a new one for an
-- entry that had none): 1..128 of A-Z a-z 0-9 _ -
-- Returns {"ok", job id, new entry id} | {"missing", ""} (no such dead letter)
-- | {"mismatch", what} (the dead letter is not what KEYS/ARGV say) | {"active", status}
-- (the job is queued or running again) | {"full", pending count}
local function refuse(code, what)
  return redis.error_reply("ERR slotfill:" .. code .. " " .. what)
end
if #KEYS ~= 10 or #ARGV ~= 2 then return refuse("invalid_argument", "want 10 KEYS, 2 ARGV") end
local dead_id, id = ARGV[1], ARGV[2]
if not string.match(dead_id, "^%d+%-%d+$") then
  return refuse("invalid_argument", "dead entry id must be <ms>-<seq>")
end
if #id < 1 or #id > 128 or string.find(id, "[^%w_%-]") then
  return refuse("invalid_argument", "job id must be 1..128 of A-Z a-z 0-9 _ -")
end
local q = string.match(KEYS[1], "^slotfill:{([%w_%.%-]+)}:dead$")
if not q or #q > 64 then return refuse("invalid_key", "KEYS[1] is not a queue's dead stream") end
local base = "slotfill:{" .. q .. "}"
local priority = string.match(KEYS[4], "^slotfill:{[^}]*}:stream:(%a+)$")
if KEYS[2] ~= base .. ":job:" .. id or KEYS[3] ~= base .. ":done:" .. id
    or KEYS[5] ~= base .. ":stats" or KEYS[6] ~= base .. ":stream:high"
    or KEYS[7] ~= base .. ":stream:normal" or KEYS[8] ~= base .. ":stream:low"
    or KEYS[9] ~= base .. ":tokens:" .. id or KEYS[10] ~= base .. ":config"
    or (KEYS[4] ~= KEYS[6] and KEYS[4] ~= KEYS[7] and KEYS[4] ~= KEYS[8]) then
  return refuse("invalid_key", "KEYS must be queue " .. q .. "'s keys for job " .. id)
end
local found = redis.call("XRANGE", KEYS[1], dead_id, dead_id)
if #found == 0 then return {"missing", ""} end
local f = {}
local flat = found[1][2]
for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
if f["stream"] ~= KEYS[4] then return {"mismatch", f["stream"] or ""} end
local job = f["job"] or ""
if job ~= "" and job ~= id then return {"mismatch", job} end
local st = redis.call("HGET", KEYS[2], "status")
if st == "queued" or st == "running" then return {"active", st} end
local max_pending = tonumber(redis.call("HGET", KEYS[10], "max_pending") or "") or 100000
local pending = redis.call("XLEN", KEYS[6]) + redis.call("XLEN", KEYS[7]) + redis.call("XLEN", KEYS[8])
if pending >= max_pending then return {"full", tostring(pending)} end
local t = redis.call("TIME")
local now = string.format("%d.%06d", t[1], t[2])
local deadline = redis.call("HGET", KEYS[2], "deadline")
local entry = redis.call("XADD", KEYS[4], "*", "id", id, "body", f["body"] or "")
redis.call("DEL", KEYS[2], KEYS[3], KEYS[9])
redis.call("HSET", KEYS[2], "status", "queued", "queued_at", now, "stream", KEYS[4],
  "entry", entry, "priority", priority, "attempts", 0, "replayed_from", dead_id)
if deadline then redis.call("HSET", KEYS[2], "deadline", deadline) end
redis.call("XDEL", KEYS[1], dead_id)
redis.call("HINCRBY", KEYS[5], "dead_replayed", 1)
return {"ok", id, entry}
