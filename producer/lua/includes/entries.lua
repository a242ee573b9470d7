-- Stream entries as the worker-side scripts see them.

-- An entry that no longer needs work leaves the stream at once (XDEL keeps XLEN = unfinished).
local function drop_entry(stream, group, entry)
  redis.call("XACK", stream, group, entry)
  redis.call("XDEL", stream, entry)
end

-- Flat field list of a stream entry -> table.
local function fields_of(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

local function valid_job_id(jid)
  return type(jid) == "string" and #jid <= 128 and string.match(jid, "^[%w_%-]+$") ~= nil
end
