-- Steps run many at once (producer/scripts.py, ``batched``): each call of a batched script
-- gets the batch's shared table as its vararg (``local batch = ...``); a call of its own gets
-- nil. The writes that touch one key for every job (acknowledging and deleting stream
-- entries, counters) are left to the batch, which does them once per key at its end, in the
-- same atomic script; alone, a step does each at once. (submit_job, which a backend in any
-- language copies whole from PROTOCOL.md, uses its batch table inline.)

-- A finished entry leaves its stream (XACK, then XDEL: XLEN counts unfinished jobs).
local function ack_entry(batch, stream, group, entry)
  if not batch then
    redis.call("XACK", stream, group, entry)
    redis.call("XDEL", stream, entry)
    return
  end
  batch.acks = batch.acks or {}
  batch.acks[stream] = batch.acks[stream] or {}
  local ids = batch.acks[stream][group] or {}
  batch.acks[stream][group] = ids
  ids[#ids + 1] = entry
end

local function count(batch, hash, field, n)
  if not batch then
    redis.call("HINCRBY", hash, field, n)
    return
  end
  batch.counts = batch.counts or {}
  batch.counts[hash] = batch.counts[hash] or {}
  batch.counts[hash][field] = (batch.counts[hash][field] or 0) + n
end
