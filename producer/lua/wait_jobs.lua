-- wait_jobs: register a waiter on many jobs of one queue, in one step: returns the results of
-- those already terminal and registers the caller on the others, so no job can end between
-- the read and the registration unseen. When a registered job ends, its terminal step pushes
-- its result JSON (with the job's "id") onto KEYS[1], once per token: pop them with BLMPOP.
-- A refused call writes nothing and replies "ERR slotfill:<code> <what>" (invalid_argument,
-- invalid_key).
-- KEYS[1] slotfill:{Q}:waiter:<token>  KEYS[2..n+1] slotfill:{Q}:job:<id> of each job (n 1..1000)
-- ARGV[1] token: 1..64 of A-Z a-z 0-9 _ - (unguessable: a fresh random one per wait)
-- ARGV[2] how long the caller waits: whole seconds 1..86400 (the waiter list expires 60 s after)
-- ARGV[3..n+2] the job ids: 1..128 of A-Z a-z 0-9 _ -
-- Returns one reply per job, in order: its result JSON (terminal), 1 (registered) or 0 (no
-- record: never submitted, its result expired, or a plain-XADD job no worker started yet).
local function refuse(code, what)
  return redis.error_reply("ERR slotfill:" .. code .. " " .. what)
end
if #KEYS < 2 or #KEYS > 1001 or #ARGV ~= #KEYS + 1 then
  return refuse("invalid_argument", "want 2..1001 KEYS and one ARGV more")
end
local token, secs = ARGV[1], ARGV[2]
if #token < 1 or #token > 64 or string.find(token, "[^%w_%-]") then
  return refuse("invalid_argument", "token must be 1..64 of A-Z a-z 0-9 _ -")
end
if not (string.match(secs, "^%d+$") and tonumber(secs) >= 1 and tonumber(secs) <= 86400) then
  return refuse("invalid_argument", "wait must be whole seconds 1..86400")
end
local q = string.match(KEYS[1], "^slotfill:{([%w_%.%-]+)}:waiter:")
if not q or #q > 64 or KEYS[1] ~= "slotfill:{" .. q .. "}:waiter:" .. token then
  return refuse("invalid_key", "KEYS[1] is not a queue's waiter list for this token")
end
local base = "slotfill:{" .. q .. "}"
for i = 2, #KEYS do
  local id = ARGV[i + 1]
  if #id < 1 or #id > 128 or string.find(id, "[^%w_%-]") then
    return refuse("invalid_argument", "job id must be 1..128 of A-Z a-z 0-9 _ -")
  end
  if KEYS[i] ~= base .. ":job:" .. id then
    return refuse("invalid_key", "KEYS[" .. i .. "] is not queue " .. q .. "'s job " .. id)
  end
end
local now = tonumber(redis.call("TIME")[1])
local mine = token .. "@" .. (now + tonumber(secs))
local out = {}
for i = 2, #KEYS do
  local h = redis.call("HMGET", KEYS[i], "status", "result", "waiters")
  if not h[1] then
    out[i - 1] = 0
  elseif h[2] then
    -- A record has its result exactly when it is terminal (each terminal step writes both in
    -- one HSET): no copy of the terminal statuses here, in a script other clients run as is.
    out[i - 1] = h[2]
  else
    -- The record's waiters: "<token>@<deadline>" items; those whose wait is over are dropped,
    -- and at most 32 kept (the newest), so a job cannot collect them without bound.
    local keep = {}
    for t, d in string.gmatch(h[3] or "", "([%w_%-]+)@(%d+)") do
      if t ~= token and tonumber(d) > now then keep[#keep + 1] = t .. "@" .. d end
    end
    while #keep >= 32 do table.remove(keep, 1) end
    keep[#keep + 1] = mine
    redis.call("HSET", KEYS[i], "waiters", table.concat(keep, " "))
    out[i - 1] = 1
  end
end
return out
