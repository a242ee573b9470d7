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

-- Take one delivered entry into this worker: mark its job running, or drop it when its job is
-- already terminal (cancelled while queued, a duplicate id). Returns the row the worker runs,
-- or nil. A row is {stream, entry id, job id or "", body or "", attempts, deliveries, flag,
-- queued_at}.
local function take(base, stream, group, consumer, entry, flat, now, deliveries)
  local f = fields_of(flat)
  local jid = f["id"]
  if type(jid) ~= "string" or not string.match(jid, "^[%w_%-]+$") or #jid > 128 then
    return {stream, entry, "", f["body"] or "", 0, deliveries, "malformed", now}
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
  return {stream, entry, jid, f["body"] or "", attempts, deliveries, flag, queued_at}
end
