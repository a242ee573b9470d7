--- @include "includes/terminal"
-- renew_leases: keep this worker's in-flight entries from being reclaimed (their idle time is
-- reset; the delivery count is not touched) and report the jobs that need attention.
-- KEYS[2i-1] stream of entry i   KEYS[2i] job hash of entry i
-- ARGV[1] group  ARGV[2] consumer  ARGV[2+2i-1] entry id i  ARGV[2+2i] "1" if entry i has a job
-- Returns one code per entry: "ok" (renewed), "cancel" (renewed; cancellation requested),
-- "done" (its job is already terminal: finished elsewhere), "lost" (no longer pending here:
-- taken over by a peer; never taken back).
local group, consumer = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS / 2 do
  local stream, jkey = KEYS[2 * i - 1], KEYS[2 * i]
  local entry, has_job = ARGV[2 + 2 * i - 1], ARGV[2 + 2 * i] == "1"
  local st, cancel = false, false
  if has_job then
    local h = redis.call("HMGET", jkey, "status", "cancel_requested")
    st, cancel = h[1], h[2]
  end
  if is_terminal(st) then
    out[i] = "done"
  else
    local p = redis.call("XPENDING", stream, group, entry, entry, 1)
    if #p == 0 or p[1][2] ~= consumer then
      out[i] = "lost"
    else
      redis.call("XCLAIM", stream, group, consumer, 0, entry, "JUSTID")
      if cancel then out[i] = "cancel" else out[i] = "ok" end
    end
  end
end
return out
