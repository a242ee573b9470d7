-- append_tokens: running -> running, with output: append one attempt's coalesced new text to
-- the job's token stream. Fenced by the attempt: a worker that lost the job (its lease was
-- taken, or the job ended) can no longer write, so readers never see two attempts mixed.
-- Idempotent by position: the record keeps how many deltas (``stream_seq``) and tokens
-- (``stream_tokens``) this attempt has written, so a retried append (its reply was lost) of
-- what is already there writes nothing, and one that would leave a gap is refused.
-- KEYS[1] job hash  KEYS[2] token stream
-- ARGV[1] attempt  ARGV[2] max entries kept  ARGV[3] TTL seconds  ARGV[4] worker
-- ARGV[5] text ("" with ARGV[6] "" = only announce the attempt)  ARGV[6] token ids (JSON)
-- ARGV[7] tokens of this attempt before this delta  ARGV[8] tokens in this delta
-- ARGV[9] this delta's number in its attempt (1, 2, ...; 0 when only announcing)
-- Returns 1 when appended or already there, 0 when fenced off, -1 when refused (a gap: the
-- delta does not follow what the stream holds).
local h = redis.call("HMGET", KEYS[1], "status", "attempts", "stream_attempt", "stream_seq",
  "stream_tokens")
if h[1] ~= "running" or h[2] ~= ARGV[1] then return 0 end
local seq, tokens = tonumber(h[4] or "0") or 0, tonumber(h[5] or "0") or 0
if h[3] ~= ARGV[1] then
  -- A new attempt: everything the earlier one wrote is dropped, so a reader starting now sees
  -- one attempt only, and a reader that saw the old one meets this start and is told.
  local id = redis.call("XADD", KEYS[2], "*", "type", "start", "attempt", ARGV[1],
    "worker", ARGV[4])
  redis.call("XTRIM", KEYS[2], "MINID", id)
  redis.call("HSET", KEYS[1], "stream_attempt", ARGV[1], "streaming", "1", "stream_seq", 0,
    "stream_tokens", 0)
  seq, tokens = 0, 0
end
if ARGV[5] ~= "" or ARGV[6] ~= "" then
  local n, offset, my_seq = tonumber(ARGV[8]), tonumber(ARGV[7]), tonumber(ARGV[9])
  if my_seq <= seq then return 1 end  -- a retry of a delta already written
  if my_seq ~= seq + 1 or offset ~= tokens then return -1 end
  redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[2], "*", "type", "delta", "attempt", ARGV[1],
    "text", ARGV[5], "ids", ARGV[6], "offset", ARGV[7])
  redis.call("HSET", KEYS[1], "stream_seq", my_seq, "stream_tokens", tokens + n)
end
redis.call("EXPIRE", KEYS[2], ARGV[3])
return 1
