-- append_tokens: running -> running, with output: append one attempt's coalesced new text to
-- the job's token stream. Fenced by the attempt: a worker that lost the job (its lease was
-- taken, or the job ended) can no longer write, so readers never see two attempts mixed.
-- KEYS[1] job hash  KEYS[2] token stream
-- ARGV[1] attempt  ARGV[2] max entries kept  ARGV[3] TTL seconds  ARGV[4] worker
-- ARGV[5] text ("" with ARGV[6] "" = only announce the attempt)  ARGV[6] token ids (JSON)
-- ARGV[7] tokens of this attempt before this delta
-- Returns 1 when appended, 0 when fenced off.
local h = redis.call("HMGET", KEYS[1], "status", "attempts", "stream_attempt")
if h[1] ~= "running" or h[2] ~= ARGV[1] then return 0 end
if h[3] ~= ARGV[1] then
  -- A new attempt: everything the earlier one wrote is dropped, so a reader starting now sees
  -- one attempt only, and a reader that saw the old one meets this start and is told.
  local id = redis.call("XADD", KEYS[2], "*", "type", "start", "attempt", ARGV[1],
    "worker", ARGV[4])
  redis.call("XTRIM", KEYS[2], "MINID", id)
  redis.call("HSET", KEYS[1], "stream_attempt", ARGV[1], "streaming", "1")
end
if ARGV[5] ~= "" or ARGV[6] ~= "" then
  redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[2], "*", "type", "delta", "attempt", ARGV[1],
    "text", ARGV[5], "ids", ARGV[6], "offset", ARGV[7])
end
redis.call("EXPIRE", KEYS[2], ARGV[3])
return 1
