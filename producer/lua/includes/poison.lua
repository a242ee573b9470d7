--- @include "includes/history"
-- The poison rule (PROTOCOL.md, Reliability), in one place.
--
-- Evidence against a job is an engine death that its own worker reported while that job was
-- the only one inside the engine (release_jobs with why = engine_crash and alone): the engine
-- crashed or hung with nothing else to blame. Each such report counts one ``solo_losses``.
-- A worker that merely vanished (kill -9, OOM killer, a reclaimed spot machine, a freeze past
-- the lease) reports nothing and is no evidence, whatever ran in it: an innocent job survives
-- any number of such losses, up to the delivery backstop below.
--
-- Every job that was inside a dead engine becomes ``suspect`` and from then on runs alone, as
-- does any job delivered ``max deliveries`` times; so a job that really kills engines is alone
-- at its second death at the latest, and dead-lettered after ``loss limit`` deaths alone:
-- at most 1 + loss limit engine deaths. A job that kills its worker outright without a report
-- (or whose reports never reach Redis) is stopped by the backstop: past ``hard limit``
-- deliveries it is dead-lettered, whatever happened.

-- The engine died (or hung) with this job inside; ``alone``: nothing else was inside.
local function charge_engine_death(jkey, now, alone)
  redis.call("HSET", jkey, "suspect", now)
  if alone then redis.call("HINCRBY", jkey, "solo_losses", 1) end
end

-- A job reclaimed from a worker that marked it running alone (``solo_run``) and never reported
-- back: the worker vanished. Recorded for the dead-letter history, never charged.
local function note_vanished_alone(jkey, now)
  local by = redis.call("HGET", jkey, "solo_run")
  if by then
    redis.call("HDEL", jkey, "solo_run")
    add_history(jkey, {at = tonumber(now), event = "vanished_alone", worker = by})
  end
end

-- How a reclaimed job runs next: "poisoned" (dead-letter it), "run_alone" or "run".
local function verdict(deliveries, suspect, solo_losses, max_deliveries, loss_limit, hard_limit)
  if solo_losses >= loss_limit or deliveries > hard_limit then return "poisoned" end
  if suspect or deliveries >= max_deliveries then return "run_alone" end
  return "run"
end
