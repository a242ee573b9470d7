--- @include "includes/poison"
-- release_jobs: this worker gives entries back before it exits (graceful drain past its grace
-- period, or engine death); they stay pending and unacknowledged, but their idle time is set
-- to the lease so the next reclaim sweep of any peer takes them at once.
-- KEYS[2i-1] stream of entry i   KEYS[2i] job hash of entry i
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] now  ARGV[4] lease in milliseconds
-- ARGV[5] why: "handed_back" | "engine_crash"
-- ARGV[6] "1" when exactly one job was in the engine when it crashed (that job is the culprit)
-- ARGV[6+2i-1] entry id i   ARGV[6+2i] "1" if entry i has a job
-- On engine_crash every job that was inside is charged the engine's death (includes/poison.lua:
-- ``suspect``, and a loss alone for the one job that was alone inside). A job handed back from
-- a run alone (drain) loses its ``solo_run`` mark: giving it back is no evidence against it.
-- Returns how many were released.
local group, consumer, now, lease, why = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local alone = ARGV[6] == "1"
local released = 0
for i = 1, #KEYS / 2 do
  local stream, jkey = KEYS[2 * i - 1], KEYS[2 * i]
  local entry, has_job = ARGV[6 + 2 * i - 1], ARGV[6 + 2 * i] == "1"
  local p = redis.call("XPENDING", stream, group, entry, entry, 1)
  if #p > 0 and p[1][2] == consumer then
    redis.call("XCLAIM", stream, group, consumer, 0, entry, "IDLE", lease, "JUSTID")
    released = released + 1
    if has_job and redis.call("EXISTS", jkey) == 1 then
      if why == "engine_crash" then charge_engine_death(jkey, now, alone) end
      redis.call("HDEL", jkey, "solo_run")  -- accounted for here, not again at reclaim
      add_history(jkey, {at = tonumber(now), event = why, worker = consumer, alone = alone})
    end
  end
end
return released
