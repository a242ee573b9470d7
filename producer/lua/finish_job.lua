--- @include "includes/terminal"
--- @include "includes/batch"
--- @include "includes/waiters"
-- finish_job: running -> succeeded | failed | cancelled | expired, exactly once.
-- KEYS[1] stream  KEYS[2] job hash  KEYS[3] done list (written unless notify=waiters)
-- KEYS[4] stats hash  KEYS[5] dead stream
-- ARGV[1] entry id  ARGV[2] group  ARGV[3] status  ARGV[4] result JSON  ARGV[5] now
-- ARGV[6] result TTL seconds  ARGV[7] dead-letter reason ("" = none)  ARGV[8] entry body
-- ARGV[9] delivery count  KEYS[6] token stream (its ``end`` entry, for a streaming job)
-- ARGV[10] the writer's attempt (the job record's ``attempts`` when it started the job)
-- ARGV[11] the job's completion callback (JSON, "" = none)  ARGV[12] when a worker may send it
-- again if its sender never confirms (unix seconds)  KEYS[7] the callback outbox (sorted set)
-- Returns 1 when this attempt's result is the job's (written now, or by an earlier call of the
-- same attempt whose reply was lost), 0 when it is not: the job already has another attempt's
-- result, or a later attempt owns it (this worker's lease was taken: only the current attempt
-- publishes, so the result is always the one its token stream shows).
local batch = ...  -- the shared table of a batched call (includes/batch.lua), else nil
-- One read of the record (the hot path of every job).
local h = redis.call("HMGET", KEYS[2], "status", "attempts", "finished_attempt", "streaming",
  "stream_attempt", "worker", "cancel_requested", "solo_run", "notify", "waiters")
if is_terminal(h[1]) then
  redis.call("XACK", KEYS[1], ARGV[2], ARGV[1])
  redis.call("XDEL", KEYS[1], ARGV[1])
  if h[3] == ARGV[10] then return 1 end
  redis.call("HINCRBY", KEYS[4], "duplicates_suppressed", 1)
  return 0
end
if h[2] and h[2] ~= ARGV[10] then
  -- Superseded: the entry is a peer's now; leave it (and its acknowledgement) to the peer.
  redis.call("HINCRBY", KEYS[4], "duplicates_suppressed", 1)
  return 0
end
local id = string.match(KEYS[2], ":job:(.*)$")
local write = {"status", ARGV[3], "result", ARGV[4], "finished_at", ARGV[5],
  "finished_attempt", ARGV[10]}
if ARGV[11] ~= "" then
  -- In the same step as the result: a sender that dies before confirming leaves it here.
  write[#write + 1] = "callback"
  write[#write + 1] = ARGV[11]
  redis.call("ZADD", KEYS[7], ARGV[12], id)
end
redis.call("HSET", KEYS[2], unpack(write))
if h[7] or h[8] then redis.call("HDEL", KEYS[2], "cancel_requested", "solo_run") end
redis.call("EXPIRE", KEYS[2], ARGV[6])
-- The done list only for a job whose submitter may block on it (plain XADD, submit_job
-- without ARGV[4]): one submitted with notify=waiters wakes its registered waiters alone.
if h[9] ~= "waiters" then
  redis.call("RPUSH", KEYS[3], ARGV[3])
  redis.call("EXPIRE", KEYS[3], ARGV[6])
end
wake_waiters(KEYS[2], h[10], ARGV[4], ARGV[5], batch)
ack_entry(batch, KEYS[1], ARGV[2], ARGV[1])
count(batch, KEYS[4], "finished_" .. ARGV[3], 1)
if h[4] then
  if h[5] and h[5] ~= ARGV[10] then
    -- This attempt wrote no output (it ended before any): its ``start`` still goes first, so
    -- the stream's last start names the attempt whose result this is.
    local id = redis.call("XADD", KEYS[6], "*", "type", "start", "attempt", ARGV[10],
      "worker", h[6] or "")
    redis.call("XTRIM", KEYS[6], "MINID", id)
    redis.call("HSET", KEYS[2], "stream_attempt", ARGV[10], "stream_seq", 0, "stream_tokens", 0)
  end
  redis.call("XADD", KEYS[6], "*", "type", "end", "status", ARGV[3])
  redis.call("EXPIRE", KEYS[6], ARGV[6])
end
if ARGV[7] ~= "" then
  local h = redis.call("HMGET", KEYS[2], "history", "attempts", "solo_losses")
  redis.call("XADD", KEYS[5], "*", "stream", KEYS[1], "entry", ARGV[1], "reason", ARGV[7],
    "deliveries", ARGV[9], "job", id, "body", ARGV[8], "at", ARGV[5],
    "attempts", h[2] or "0", "solo_losses", h[3] or "0", "history", h[1] or "[]")
  redis.call("HINCRBY", KEYS[4], "dead_lettered", 1)
end
return 1
