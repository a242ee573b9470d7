-- Waking the clients that wait on a job (wait_jobs.lua registers them). The job record's
-- ``waiters`` field lists "<token>@<deadline>" items (deadline: unix seconds, Redis clock);
-- a terminal transition pushes the job's result JSON (it carries the job's ``id``) onto each
-- live waiter's list slotfill:{Q}:waiter:<token>, which expires WAITER_GRACE_S after that
-- waiter's deadline: the waiter pops its results with no read of the records after.
-- Nobody waiting: nothing is written.
local WAITER_GRACE_S = 60

local function wake_waiters(jkey, waiters, result, now, batch)
  if not waiters then return end
  local base = string.match(jkey, "^(.*):job:")
  local t = tonumber(now) or 0
  for token, deadline in string.gmatch(waiters, "([%w_%-]+)@(%d+)") do
    local left = tonumber(deadline) - t
    if left > 0 then
      local key = base .. ":waiter:" .. token
      redis.call("RPUSH", key, result)
      -- One EXPIRE per waiter list per batch: a batch often ends many jobs of one waiter.
      if not (batch and batch.woken and batch.woken[key]) then
        redis.call("EXPIRE", key, math.ceil(left) + WAITER_GRACE_S)
        if batch then
          batch.woken = batch.woken or {}
          batch.woken[key] = true
        end
      end
    end
  end
end
