-- reclaim_jobs: running on a silent worker -> running here, for entries idle past the lease.
-- KEYS[1..3] streams high, normal, low
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] count  ARGV[4] now  ARGV[5] key base
-- ARGV[6] lease in milliseconds  ARGV[7] max deliveries  ARGV[8] solo rows allowed (0 or 1)
-- ARGV[9] solo loss limit  ARGV[10] idle milliseconds after which a consumer with nothing
-- pending is forgotten  ARGV[11] hard delivery limit
-- Returns rows (see take()); deliveries is the entry's delivery count after this claim.
--
-- Culprit isolation: a job whose engine died while it was inside (``suspect``), or that has
-- been delivered ARGV[7] times, comes back with solo = 1 and runs alone. Such a row is
-- claimed only when the caller can take it now (ARGV[8]), one at a time; left unclaimed, it
-- waits for a worker that can. A job lost while it ran alone (its worker marked the run with
-- ``solo_run``, and it never finished) counts a ``solo_losses``: it took down whatever ran
-- it, with nothing else to blame. After ARGV[9] of those, or past ARGV[11] deliveries whatever
-- happened, it comes back flagged ``poisoned`` (the worker dead-letters it). Deliveries lost
-- while merely batched with others, or held waiting for an empty engine, are no evidence.
local group, consumer, base = ARGV[1], ARGV[2], ARGV[5]
local now, lease = ARGV[4], tonumber(ARGV[6])
local max_deliveries, loss_limit = tonumber(ARGV[7]), tonumber(ARGV[9])
local hard_limit = tonumber(ARGV[11])
local out = {}
local remaining = tonumber(ARGV[3])
local solo_left = tonumber(ARGV[8])
local SCAN_LIMIT = 1000

for _, stream in ipairs(KEYS) do
  local start = "-"
  local scanned = 0
  while remaining > 0 and scanned < SCAN_LIMIT do
    local pend = redis.call("XPENDING", stream, group, "IDLE", lease, start, "+", 100)
    if #pend == 0 then break end
    for _, p in ipairs(pend) do
      scanned = scanned + 1
      local id = p[1]
      start = "(" .. id
      if remaining <= 0 then break end
      local deliveries = tonumber(p[4]) + 1
      local e = redis.call("XRANGE", stream, id, id)
      if #e == 0 then
        redis.call("XACK", stream, group, id)  -- deleted meanwhile: nothing left to run
      else
        local jid = fields_of(e[1][2])["id"]
        local suspect, losses, lost_alone = false, 0, false
        if valid_job_id(jid) then
          local h = redis.call("HMGET", base .. ":job:" .. jid, "suspect", "solo_losses",
            "solo_run")
          suspect = h[1] ~= false and h[1] ~= nil
          losses = tonumber(h[2] or "0") or 0
          lost_alone = h[3] ~= false and h[3] ~= nil
          if lost_alone then losses = losses + 1 end
        end
        local poisoned = deliveries > hard_limit or losses >= loss_limit
        local solo = (not poisoned) and (suspect or deliveries >= max_deliveries)
        if not (solo and solo_left <= 0) then
          local claimed = redis.call("XCLAIM", stream, group, consumer, lease, id)
          if #claimed > 0 and claimed[1] then
            if lost_alone then
              local jkey = base .. ":job:" .. jid
              local by = redis.call("HGET", jkey, "solo_run")
              redis.call("HINCRBY", jkey, "solo_losses", 1)
              redis.call("HDEL", jkey, "solo_run")
              add_history(jkey, {at = tonumber(now), event = "lost_alone", worker = by})
            end
            local row = take(base, stream, group, consumer, id, claimed[1][2], now, deliveries)
            if row then
              if row[3] ~= "" then
                add_history(base .. ":job:" .. row[3], {at = tonumber(now), event = "reclaimed",
                  worker = consumer, delivery = deliveries, solo = solo})
              end
              if row[7] == "" and poisoned then
                row[7] = "poisoned"
              elseif row[7] == "" and solo then
                row[9] = 1
                solo_left = solo_left - 1
              end
              out[#out + 1] = row
              remaining = remaining - 1
              redis.call("HINCRBY", base .. ":stats", "reclaimed", 1)
            end
          end
        end
      end
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
