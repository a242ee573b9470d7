-- submit_job: (nothing) -> queued. Trusts nothing its caller sends: a refused call writes
-- nothing and replies with the error "ERR slotfill:<code> <what>", code one of
-- invalid_argument, invalid_key, invalid_body, payload_too_large.
-- KEYS[1] slotfill:{Q}:stream:<the body's priority, "normal" when it has none>
-- KEYS[2] slotfill:{Q}:job:<id>   KEYS[3] slotfill:{Q}:idem:<idempotency key, "-" for none>
-- KEYS[4..6] slotfill:{Q}:stream:high, ...:normal, ...:low (counted against the cap)
-- KEYS[7] slotfill:{Q}:config (the queue's max_pending and max_payload_bytes)
-- ARGV[1] job id: 1..128 of A-Z a-z 0-9 _ -
-- ARGV[2] body: a JSON object in UTF-8; "priority", "stream" and "deadline" are read here
-- ARGV[3] idempotency key TTL: whole seconds 1..31536000, or "" for no idempotency key
-- ARGV[4] (may be left out) how the job's end is announced: "waiters" = only to waiters
-- registered with wait_jobs, no done list; "" or left out = the done list as well (what a
-- client that blocks on slotfill:{Q}:done:<id> needs)
-- Returns {"ok", id} | {"exists", job id} (the idempotency key or the job id is taken: the
-- existing job is left as it is) | {"full", pending count} (nothing written: retry later)
-- Run by a batched call (producer/scripts.py) it gets the batch's shared table, alone nil:
-- what every call of one batch reads alike (the queue's limits, its unfinished count, Redis'
-- clock) is read once per batch.
local batch = ...
local function refuse(code, what)
  return redis.error_reply("ERR slotfill:" .. code .. " " .. what)
end
if #KEYS ~= 7 or (#ARGV ~= 3 and #ARGV ~= 4) then
  return refuse("invalid_argument", "want 7 KEYS, 3 or 4 ARGV")
end
local id, body, idem_ttl, notify = ARGV[1], ARGV[2], ARGV[3], ARGV[4] or ""
if notify ~= "" and notify ~= "waiters" then
  return refuse("invalid_argument", "ARGV[4] must be \"waiters\" or empty")
end
if #id < 1 or #id > 128 or string.find(id, "[^%w_%-]") then
  return refuse("invalid_argument", "job id must be 1..128 of A-Z a-z 0-9 _ -")
end
local q = string.match(KEYS[4], "^slotfill:{([%w_%.%-]+)}:stream:high$")
if not q or #q > 64 then return refuse("invalid_key", "KEYS[4] is not a queue's high stream") end
local base = "slotfill:{" .. q .. "}"
local idem_prefix = base .. ":idem:"
if KEYS[2] ~= base .. ":job:" .. id or KEYS[5] ~= base .. ":stream:normal"
    or KEYS[6] ~= base .. ":stream:low" or KEYS[7] ~= base .. ":config"
    or string.sub(KEYS[3], 1, #idem_prefix) ~= idem_prefix
    or #KEYS[3] == #idem_prefix or #KEYS[3] > #idem_prefix + 256 then
  return refuse("invalid_key", "KEYS must be queue " .. q .. "'s keys for job " .. id)
end
if idem_ttl ~= "" and not (string.match(idem_ttl, "^%d+$") and tonumber(idem_ttl) >= 1
    and tonumber(idem_ttl) <= 31536000) then
  return refuse("invalid_argument", "idempotency TTL must be whole seconds 1..31536000 or empty")
end
local queue = batch and batch[base]
if not queue then
  local cfg = redis.call("HMGET", KEYS[7], "max_pending", "max_payload_bytes")
  queue = {max_pending = tonumber(cfg[1] or "") or 100000,
    max_payload = tonumber(cfg[2] or "") or 1048576}
  if batch then batch[base] = queue end
end
if #body > queue.max_payload then
  return refuse("payload_too_large", "body is " .. #body .. " bytes, over " .. queue.max_payload)
end
-- UTF-8: every byte >= 0x80 must belong to a well-formed sequence (no overlongs, no
-- surrogates, nothing past U+10FFFF). Each pass replaces whole sequences by an ASCII byte, so
-- no pass can join pieces into a sequence that was not there.
if string.find(body, "[\128-\255]") then
  local s = string.gsub(body, "[\194-\223][\128-\191]", "_")
  s = string.gsub(s, "\224[\160-\191][\128-\191]", "_")
  s = string.gsub(s, "[\225-\236\238\239][\128-\191][\128-\191]", "_")
  s = string.gsub(s, "\237[\128-\159][\128-\191]", "_")
  s = string.gsub(s, "\240[\144-\191][\128-\191][\128-\191]", "_")
  s = string.gsub(s, "[\241-\243][\128-\191][\128-\191][\128-\191]", "_")
  s = string.gsub(s, "\244[\128-\143][\128-\191][\128-\191]", "_")
  if string.find(s, "[\128-\255]") then return refuse("invalid_body", "body is not UTF-8") end
end
local ok, req = false, nil
if string.find(body, "^%s*{") then ok, req = pcall(cjson.decode, body) end
if not ok or type(req) ~= "table" then return refuse("invalid_body", "body must be a JSON object") end
local priority, streams, deadline = req["priority"], req["stream"], req["deadline"]
if priority == nil or priority == cjson.null then priority = "normal" end
if priority ~= "high" and priority ~= "normal" and priority ~= "low" then
  return refuse("invalid_body", "priority must be \"high\", \"normal\" or \"low\"")
end
if KEYS[1] ~= base .. ":stream:" .. priority then
  return refuse("invalid_key", "KEYS[1] must be the stream of the body's priority " .. priority)
end
if streams == nil or streams == cjson.null then streams = false end
if type(streams) ~= "boolean" then return refuse("invalid_body", "stream must be a boolean") end
if deadline == cjson.null then deadline = nil end
if deadline ~= nil and (type(deadline) ~= "number" or deadline ~= deadline or deadline <= 0
    or deadline >= math.huge) then
  return refuse("invalid_body", "deadline must be a finite positive number (unix seconds)")
end
if idem_ttl ~= "" then
  local existing = redis.call("GET", KEYS[3])
  if existing then return {"exists", existing} end
end
if redis.call("EXISTS", KEYS[2]) == 1 then return {"exists", id} end
if not queue.pending then
  queue.pending = redis.call("XLEN", KEYS[4]) + redis.call("XLEN", KEYS[5])
    + redis.call("XLEN", KEYS[6])
end
if queue.pending >= queue.max_pending then return {"full", tostring(queue.pending)} end
if not queue.now then
  local t = redis.call("TIME")
  queue.now = string.format("%d.%06d", t[1], t[2])
end
local now = queue.now
local entry = redis.call("XADD", KEYS[1], "*", "id", id, "body", body)
queue.pending = queue.pending + 1
local record = {"status", "queued", "queued_at", now, "stream", KEYS[1], "entry", entry,
  "priority", priority, "attempts", 0}
if notify ~= "" then
  record[#record + 1] = "notify"
  record[#record + 1] = notify
end
if deadline then
  record[#record + 1] = "deadline"
  record[#record + 1] = string.format("%.17g", deadline)
end
if streams then
  record[#record + 1] = "streaming"
  record[#record + 1] = "1"
end
redis.call("HSET", KEYS[2], unpack(record))
if idem_ttl ~= "" then redis.call("SET", KEYS[3], id, "EX", idem_ttl) end
return {"ok", id}
