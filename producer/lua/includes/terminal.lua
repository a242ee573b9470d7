-- The terminal job statuses, written once: every script that asks "has this job finished?"
-- includes this file (tests/test_lua_includes.py checks it against Python's JobStatus).
local TERMINAL = {succeeded = true, failed = true, cancelled = true, expired = true}

local function is_terminal(status)
  return TERMINAL[status] == true
end
