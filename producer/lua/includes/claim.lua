--- @include "includes/terminal"
--- @include "includes/entries"
-- Take one delivered entry into this worker: mark its job running, or drop it when its job is
-- already terminal (cancelled while queued, a duplicate id). Returns the claim the worker runs
-- and its disposition, or nil. A claim is flat field/value pairs (decoded in one place,
-- worker/claim.py): stream, entry, job (id, "" for a malformed entry), body, attempts,
-- deliveries, disposition, queued_at. The disposition is "malformed" (no usable id),
-- "cancelled" (cancel requested), "expired" (deadline passed) or else ``runnable``: "run", or
-- reclaim's verdict ("run_alone", "poisoned").
local function take(base, stream, group, consumer, entry, flat, now, deliveries, runnable)
  local f = fields_of(flat)
  local jid = f["id"]
  local function claim(job, attempts, disposition, queued_at)
    return {"stream", stream, "entry", entry, "job", job, "body", f["body"] or "",
      "attempts", attempts, "deliveries", deliveries, "disposition", disposition,
      "queued_at", queued_at}, disposition
  end
  if not valid_job_id(jid) then
    return claim("", 0, "malformed", now)
  end
  local jkey = base .. ":job:" .. jid
  -- One read of everything this step decides on, one write (the hot path of every job).
  local rec = redis.call("HMGET", jkey, "status", "entry", "attempts", "queued_at", "deadline",
    "cancel_requested")
  local st, own = rec[1], rec[2]
  if is_terminal(st) then
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
  -- The record is anyone's to write (a client's ACL allows HSET): a field that is not the
  -- number it must be is replaced, never passed on, so no record content can make a worker
  -- fail to read its claim (it would crash on every delivery, past every backstop).
  local attempts = tonumber(rec[3] or "0")
  if not attempts or attempts ~= math.floor(attempts) or attempts < 0 or attempts > 1e9 then
    attempts = 0
  end
  attempts = attempts + 1
  local queued_at = rec[4]
  local q = tonumber(queued_at or "")
  local write = {"status", "running", "started_at", now, "worker", consumer, "entry", entry,
    "stream", stream, "attempts", attempts}
  if not q or q ~= q or q == math.huge or q == -math.huge then
    queued_at = now
    write[#write + 1] = "queued_at"
    write[#write + 1] = now
  end
  redis.call("HSET", jkey, unpack(write))
  local disposition = runnable
  local deadline = tonumber(rec[5] or "")
  if rec[6] then
    disposition = "cancelled"
  elseif deadline and deadline <= tonumber(now) then
    disposition = "expired"
  end
  return claim(jid, attempts, disposition, queued_at)
end
