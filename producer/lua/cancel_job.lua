-- cancel_job: queued -> cancelled at once; running -> cancel requested (the worker aborts it).
-- A refused call writes nothing and replies "ERR slotfill:<code> <what>" (invalid_argument,
-- invalid_key).
-- KEYS[1] slotfill:{Q}:job:<id>  KEYS[2] slotfill:{Q}:done:<id>  KEYS[3] slotfill:{Q}:control (sharded)
-- KEYS[4] slotfill:{Q}:tokens:<id>
-- ARGV[1] job id: 1..128 of A-Z a-z 0-9 _ -   ARGV[2] result TTL: whole seconds 1..31536000
-- Returns "cancelled" | "requested" | "finished" (already terminal) | "unknown"
local function refuse(code, what)
  return redis.error_reply("ERR slotfill:" .. code .. " " .. what)
end
if #KEYS ~= 4 or #ARGV ~= 2 then return refuse("invalid_argument", "want 4 KEYS, 2 ARGV") end
local id, ttl = ARGV[1], ARGV[2]
if #id < 1 or #id > 128 or string.find(id, "[^%w_%-]") then
  return refuse("invalid_argument", "job id must be 1..128 of A-Z a-z 0-9 _ -")
end
if not (string.match(ttl, "^%d+$") and tonumber(ttl) >= 1 and tonumber(ttl) <= 31536000) then
  return refuse("invalid_argument", "result TTL must be whole seconds 1..31536000")
end
local q = string.match(KEYS[3], "^slotfill:{([%w_%.%-]+)}:control$")
if not q or #q > 64 then return refuse("invalid_key", "KEYS[3] is not a queue's control channel") end
local base = "slotfill:{" .. q .. "}"
if KEYS[1] ~= base .. ":job:" .. id or KEYS[2] ~= base .. ":done:" .. id
    or KEYS[4] ~= base .. ":tokens:" .. id then
  return refuse("invalid_key", "KEYS must be queue " .. q .. "'s keys for job " .. id)
end
local h = redis.call("HMGET", KEYS[1], "status", "stream", "entry", "queued_at", "streaming",
  "notify", "waiters")
local st = h[1]
if not st then return "unknown" end
if st == "queued" then
  local t = redis.call("TIME")
  local now = tonumber(string.format("%d.%06d", t[1], t[2]))
  -- Queued means no worker has read the entry yet (start_jobs marks running atomically).
  if h[2] and h[3] then redis.call("XDEL", h[2], h[3]) end
  local result = cjson.encode({id = id, status = "cancelled", text = "",
    finish_reason = "cancelled", usage = {prompt_tokens = 0, completion_tokens = 0},
    timings = {queued_at = tonumber(h[4] or ""), finished_at = now}, attempts = 0,
    error = {code = "cancelled", message = "cancelled before it ran", retryable = false}})
  redis.call("HSET", KEYS[1], "status", "cancelled", "result", result, "finished_at", now)
  redis.call("EXPIRE", KEYS[1], ttl)
  if h[6] ~= "waiters" then  -- the done list only where a submitter may block on it
    redis.call("RPUSH", KEYS[2], "cancelled")
    redis.call("EXPIRE", KEYS[2], ttl)
  end
  -- Wake the waiters wait_jobs registered (as finish_job does; inline: this script is
  -- copied whole by backends in other languages).
  for token, deadline in string.gmatch(h[7] or "", "([%w_%-]+)@(%d+)") do
    local left = tonumber(deadline) - now
    if left > 0 then
      redis.call("RPUSH", base .. ":waiter:" .. token, result)
      redis.call("EXPIRE", base .. ":waiter:" .. token, math.ceil(left) + 60)
    end
  end
  if h[5] then
    redis.call("XADD", KEYS[4], "*", "type", "end", "status", "cancelled")
    redis.call("EXPIRE", KEYS[4], ttl)
  end
  return "cancelled"
end
if st == "running" then
  local t = redis.call("TIME")
  redis.call("HSET", KEYS[1], "cancel_requested", string.format("%d.%06d", t[1], t[2]))
  redis.call("SPUBLISH", KEYS[3], id)  -- sharded: stays on the queue's slot in a cluster
  return "requested"
end
return "finished"
