-- Append one event to a job's history (JSON array, kept short): reclaims, engine crashes and
-- hand-backs, so a dead letter shows what happened to its job. Never on the hot path.
local HISTORY_MAX = 20
local function add_history(jkey, event)
  local raw = redis.call("HGET", jkey, "history")
  local h = {}
  if raw then
    local ok, decoded = pcall(cjson.decode, raw)
    if ok and type(decoded) == "table" then h = decoded end
  end
  h[#h + 1] = event
  while #h > HISTORY_MAX do table.remove(h, 1) end
  redis.call("HSET", jkey, "history", cjson.encode(h))
end
