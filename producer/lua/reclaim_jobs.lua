--- @include "includes/claim"
--- @include "includes/poison"
-- reclaim_jobs: running on a silent worker -> running here, for entries idle past the lease.
-- KEYS[1..3] streams high, normal, low
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] count  ARGV[4] now  ARGV[5] key base
-- ARGV[6] lease in milliseconds  ARGV[7] max deliveries  ARGV[8] solo rows allowed (0 or 1)
-- ARGV[9] solo loss limit  ARGV[10] idle milliseconds after which a consumer with nothing
-- pending is forgotten  ARGV[11] hard delivery limit
-- ARGV[12] (may be left out) "own": take back only the caller's own entries idle ARGV[6] ms,
-- those a claim of its own gave it whose reply it never got (a timeout, a dropped connection),
-- as the same delivery: none is counted, and the record's history says "adopted"
-- Returns claims (see take()); deliveries is the entry's delivery count after this claim.
--
-- Culprit isolation (the rule: includes/poison.lua): a job that is ``suspect`` or has been
-- delivered ARGV[7] times comes back as "run_alone". Such an entry is claimed only when the
-- caller can run it now (ARGV[8]), one at a time; left unclaimed, it waits for a worker that
-- can. A job past its limits comes back "poisoned" (the worker dead-letters it).
local group, consumer, base = ARGV[1], ARGV[2], ARGV[5]
local now, lease = ARGV[4], tonumber(ARGV[6])
local max_deliveries, loss_limit = tonumber(ARGV[7]), tonumber(ARGV[9])
local hard_limit = tonumber(ARGV[11])
local own = ARGV[12] == "own"
if ARGV[12] and ARGV[12] ~= "" and not own then
  return redis.error_reply("ERR slotfill:invalid_argument ARGV[12] must be \"own\" or empty")
end
local event = own and "adopted" or "reclaimed"
local out = {}
local remaining = tonumber(ARGV[3])
local solo_left = tonumber(ARGV[8])
local SCAN_LIMIT = 1000

-- The verdict for one pending entry, from its job's record (an entry without a usable id has
-- none: only the delivery backstop applies to it).
local function verdict_for(jid, deliveries)
  local suspect, losses = false, 0
  if valid_job_id(jid) then
    local h = redis.call("HMGET", base .. ":job:" .. jid, "suspect", "solo_losses")
    suspect = h[1] ~= false and h[1] ~= nil
    losses = tonumber(h[2] or "0") or 0
  end
  return verdict(deliveries, suspect, losses, max_deliveries, loss_limit, hard_limit)
end

-- Claim one pending entry if this caller may run it; returns true when a claim was added.
local function reclaim_one(stream, id, deliveries)
  local e = redis.call("XRANGE", stream, id, id)
  if #e == 0 then
    redis.call("XACK", stream, group, id)  -- deleted meanwhile: nothing left to run
    return false
  end
  local jid = fields_of(e[1][2])["id"]
  local v = verdict_for(jid, deliveries)
  if v == "run_alone" and solo_left <= 0 then return false end
  -- RETRYCOUNT: the delivery count this sweep decided on (one more, or the same for our own).
  local claimed = redis.call("XCLAIM", stream, group, consumer, lease, id,
    "RETRYCOUNT", deliveries)
  if #claimed == 0 or not claimed[1] then return false end
  if valid_job_id(jid) and not own then note_vanished_alone(base .. ":job:" .. jid, now) end
  local row, disposition = take(base, stream, group, consumer, id, claimed[1][2], now,
    deliveries, v)
  if not row then return false end
  if valid_job_id(jid) then
    add_history(base .. ":job:" .. jid, {at = tonumber(now), event = event,
      worker = consumer, delivery = deliveries, solo = v == "run_alone"})
  end
  if disposition == "run_alone" then solo_left = solo_left - 1 end
  out[#out + 1] = row
  redis.call("HINCRBY", base .. ":stats", event, 1)
  return true
end

for _, stream in ipairs(KEYS) do
  local start = "-"
  local scanned = 0
  while remaining > 0 and scanned < SCAN_LIMIT do
    local pend
    if own then
      pend = redis.call("XPENDING", stream, group, "IDLE", lease, start, "+", 100, consumer)
    else
      pend = redis.call("XPENDING", stream, group, "IDLE", lease, start, "+", 100)
    end
    if #pend == 0 then break end
    for _, p in ipairs(pend) do
      scanned = scanned + 1
      start = "(" .. p[1]
      if remaining <= 0 then break end
      local deliveries = tonumber(p[4]) + (own and 0 or 1)
      if reclaim_one(stream, p[1], deliveries) then remaining = remaining - 1 end
    end
  end
end

-- Forget consumers (dead workers) that hold nothing and have been silent for long.
local forget_after = tonumber(ARGV[10])
if forget_after > 0 then
  for _, stream in ipairs(KEYS) do
    local ok, consumers = pcall(redis.call, "XINFO", "CONSUMERS", stream, group)
    if ok then
      for _, c in ipairs(consumers) do
        local info = fields_of(c)
        if info["name"] ~= consumer and tonumber(info["pending"]) == 0
            and tonumber(info["idle"]) > forget_after then
          redis.call("XGROUP", "DELCONSUMER", stream, group, info["name"])
        end
      end
    end
  end
end
return out
