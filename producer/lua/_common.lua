-- Shared by the worker-side scripts (prepended when the script is loaded).
local TERMINAL = {succeeded = true, failed = true, cancelled = true, expired = true}

-- An entry that no longer needs work leaves the stream at once (XDEL keeps XLEN = unfinished).
local function drop_entry(stream, group, entry)
  redis.call("XACK", stream, group, entry)
  redis.call("XDEL", stream, entry)
end

-- Flat field list of a stream entry -> table.
local function fields_of(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

-- Append one event to a job's history (JSON array, kept short): reclaims, engine crashes and
-- hand-backs, so a dead letter shows what happened to its job. Never on the hot path.
local HISTORY_MAX = 20
local function add_history(jkey, event)
  local raw = redis.call("HGET", jkey, "history")
  local h = {}
  if raw then
    local ok, decoded = pcall(cjson.decode, raw)
    if ok and type(decoded) == "table" then h = decoded end
  end
  h[#h + 1] = event
  while #h > HISTORY_MAX do table.remove(h, 1) end
  redis.call("HSET", jkey, "history", cjson.encode(h))
end

local function valid_job_id(jid)
  return type(jid) == "string" and #jid <= 128 and string.match(jid, "^[%w_%-]+$") ~= nil
end

-- Take one delivered entry into this worker: mark its job running, or drop it when its job is
-- already terminal (cancelled while queued, a duplicate id). Returns the row the worker runs,
-- or nil. A row is {stream, entry id, job id or "", body or "", attempts, deliveries, flag,
-- queued_at, solo}; solo is 1 when the row must run alone in the engine (set by reclaim).
local function take(base, stream, group, consumer, entry, flat, now, deliveries)
  local f = fields_of(flat)
  local jid = f["id"]
  if not valid_job_id(jid) then
    return {stream, entry, "", f["body"] or "", 0, deliveries, "malformed", now, 0}
  end
  local jkey = base .. ":job:" .. jid
  local st = redis.call("HGET", jkey, "status")
  local own = redis.call("HGET", jkey, "entry")
  if st and TERMINAL[st] then
    drop_entry(stream, group, entry)
    if own and own ~= entry then redis.call("HINCRBY", base .. ":stats", "duplicate_entries", 1) end
    return nil
  end
  if own and own ~= entry then
    -- A second stream entry carrying an id that is already taken: never run it twice.
    drop_entry(stream, group, entry)
    redis.call("HINCRBY", base .. ":stats", "duplicate_entries", 1)
    return nil
  end
  local attempts = redis.call("HINCRBY", jkey, "attempts", 1)
  redis.call("HSET", jkey, "status", "running", "started_at", now, "worker", consumer,
    "entry", entry, "stream", stream)
  local queued_at = redis.call("HGET", jkey, "queued_at")
  if not queued_at then
    queued_at = now
    redis.call("HSET", jkey, "queued_at", now)
  end
  local flag = ""
  if redis.call("HGET", jkey, "cancel_requested") then flag = "cancel" end
  local deadline = tonumber(redis.call("HGET", jkey, "deadline") or "")
  if flag == "" and deadline and deadline <= tonumber(now) then flag = "expired" end
  return {stream, entry, jid, f["body"] or "", attempts, deliveries, flag, queued_at, 0}
end
