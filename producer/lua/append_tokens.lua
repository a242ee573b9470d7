-- append_tokens: running -> running, with output: append one attempt's coalesced new output to
-- the job's token stream (a streaming job) and to its checkpoint (the generated token ids a
-- reclaiming worker resumes from), both in this one step so they never disagree. Fenced by
-- the attempt: a worker that lost the job (its lease was taken, or the job ended) can no
-- longer write, so readers never see two attempts mixed and the checkpoint holds one lineage.
-- Idempotent by position: the record keeps how many deltas (``stream_seq``) and tokens
-- (``stream_tokens``, ``ckpt_tokens``) are written, so a retried append (its reply was lost)
-- of what is already there writes nothing, and one that would leave a gap is refused.
-- KEYS[1] job hash  KEYS[2] token stream  KEYS[3] checkpoint (a string of "id," items)
-- ARGV[1] attempt  ARGV[2] max entries kept  ARGV[3] TTL seconds  ARGV[4] worker
-- ARGV[5] text ("" with ARGV[6] "" = only announce the attempt)  ARGV[6] token ids (JSON)
-- ARGV[7] the job's tokens before this delta (earlier attempts' resumed-from ones included)
-- ARGV[8] tokens in this delta  ARGV[9] this delta's number in its attempt (1, 2, ...; 0 when
-- only announcing)  ARGV[10] "1": write the token stream, "0": checkpoint only
-- ARGV[11] this delta's ids as checkpoint items ("" = no checkpoint write)
-- ARGV[12] tokens of the checkpoint this attempt resumed from ("" = it started from scratch)
-- ARGV[13] checkpoint TTL seconds
-- Returns 1 when appended or already there, 0 when fenced off, -1 when refused (a gap: the
-- delta does not follow what the stream or checkpoint holds).
local h = redis.call("HMGET", KEYS[1], "status", "attempts", "stream_attempt", "stream_seq",
  "stream_tokens", "ckpt_attempt", "ckpt_tokens")
if h[1] ~= "running" or h[2] ~= ARGV[1] then return 0 end
local resumed = ARGV[12] ~= ""
local at = tonumber(ARGV[12]) or 0
local ck = tonumber(h[7] or "0") or 0
local new_ck = h[6] ~= ARGV[1]
if new_ck then
  -- This attempt's first write: it continues the checkpoint it read, or starts it over.
  if resumed and at ~= ck then return -1 end
  if not resumed then ck = 0 end
end
local stream = ARGV[10] == "1"
local seq, tokens = tonumber(h[4] or "0") or 0, tonumber(h[5] or "0") or 0
local new_stream = stream and h[3] ~= ARGV[1]
if new_stream then
  if resumed and h[3] and tokens ~= at then return -1 end
  seq = 0
  tokens = resumed and at or 0
end
local has_delta = ARGV[5] ~= "" or ARGV[6] ~= ""
local n, offset, my_seq = tonumber(ARGV[8]), tonumber(ARGV[7]), tonumber(ARGV[9])
local write_stream = stream and has_delta and my_seq > seq
if write_stream and (my_seq ~= seq + 1 or offset ~= tokens) then return -1 end
local write_ck = ARGV[11] ~= "" and offset + n > ck
if write_ck and offset ~= ck then return -1 end
-- Checked: now write.
if new_ck then
  if not resumed then redis.call("DEL", KEYS[3]) end
  redis.call("HSET", KEYS[1], "ckpt_attempt", ARGV[1], "ckpt_tokens", ck)
end
if new_stream then
  if resumed and h[3] then
    -- A reader keeps what it has: the job goes on from token ``at`` on another worker.
    redis.call("XADD", KEYS[2], "*", "type", "moved", "attempt", ARGV[1], "worker", ARGV[4],
      "at", at)
  else
    -- A new attempt from scratch: everything the earlier one wrote is dropped, so a reader
    -- starting now sees one attempt only, and a reader that saw the old one is told.
    local id = redis.call("XADD", KEYS[2], "*", "type", "start", "attempt", ARGV[1],
      "worker", ARGV[4])
    redis.call("XTRIM", KEYS[2], "MINID", id)
  end
  redis.call("HSET", KEYS[1], "stream_attempt", ARGV[1], "streaming", "1", "stream_seq", 0,
    "stream_tokens", tokens)
end
if write_stream then
  redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[2], "*", "type", "delta", "attempt", ARGV[1],
    "text", ARGV[5], "ids", ARGV[6], "offset", ARGV[7])
end
if write_ck then redis.call("APPEND", KEYS[3], ARGV[11]) end
if write_ck then redis.call("EXPIRE", KEYS[3], ARGV[13]) end
if write_stream and write_ck then
  redis.call("HSET", KEYS[1], "stream_seq", my_seq, "stream_tokens", tokens + n,
    "ckpt_tokens", ck + n)
elseif write_stream then
  redis.call("HSET", KEYS[1], "stream_seq", my_seq, "stream_tokens", tokens + n)
elseif write_ck then
  redis.call("HSET", KEYS[1], "ckpt_tokens", ck + n)
end
if stream then redis.call("EXPIRE", KEYS[2], ARGV[3]) end
return 1
