--@script     pick.round_robin
--@summary    Picks the next live, non-draining node after the cursor in index order (registration order;
--@+          a reused index takes the removed node's place), wrapping around, and moves the cursor to it in
--@+          the same step. The cursor is the index of the last pick, so a node joining or leaving changes
--@+          only its own turns: no node gets two turns in a row unless it is the only candidate.
--@key        ring      zset    luasched:{ns}:pick:ring -- registered, non-draining indexes scored by index.
--@key        state     hash    luasched:{ns}:pick:state -- pick bookkeeping: cursor (index of the last
--@+          round-robin pick), clock (logical clock of pick.least_recent).
--@key        deadline  zset    luasched:{ns}:nodes:deadline -- index scored by its heartbeat deadline
--@+          (server ms); live while deadline > now.
--@key        node_id   hash    luasched:{ns}:nodes:id -- index -> node id.
--@reply      string  The chosen node's id.
--@error      ARG  Not 4 keys, or any argument.
--@error      NONODE  No node is live and not draining; nothing changed.
--@error      SCANLIMIT  The next 128 candidates were all dead (not swept yet);
--@+          nothing changed.
--@error      CORRUPT  A key holds another type or shape than the layout; nothing changed.
--@complexity O(log n) for n eligible nodes; O(k log n) when k dead nodes are skipped (k <= 128)
--@since      6.2
-- ---------------------------------------------------------------------------------------------
-- prelude (lua/include/prelude.lua.j2): error replies and argument checks shared by every script.
--
-- Invariants every script relies on:
--   * fail() raises; run() turns a raised failure into the reply
--     "LUASCHED_<CODE> <script>: <detail>". Scripts validate everything before their first
--     write, so a failure never leaves a partial change behind (Redis does not roll back).
--   * Integers are accepted only in plain decimal ("-12", "0", "42"): no hex, no exponent, no
--     spaces, no "inf"/"nan" (Lua's tonumber would take all of these). Their magnitude stays
--     below 2^53 so they are exact in Lua's doubles.
--   * Details echo at most 40 bytes of the offending value, with non-printable bytes shown as
--     "?", so a reply stays short and printable whatever the input.
-- ---------------------------------------------------------------------------------------------
local SCRIPT_NAME = 'pick.round_robin'
local MAX_SAFE_INTEGER = 9007199254740991

local function fail(code, detail)
  error({ luasched_error = 'LUASCHED_' .. code .. ' ' .. SCRIPT_NAME .. ': ' .. detail }, 0)
end

local function show(value)
  if value == nil then
    return '(missing)'
  end
  value = tostring(value)
  local suffix = ''
  if #value > 40 then
    value = string.sub(value, 1, 40)
    suffix = '...'
  end
  return '"' .. string.gsub(value, '[^%w%p ]', '?') .. '"' .. suffix
end

-- A number for a message: integers in full ("9007199254740991", not tostring's "9.007199254741e+15").
local function decimal(value)
  if value == math.floor(value) and value > -1e16 and value < 1e16 then
    return string.format('%.0f', value)
  end
  return tostring(value)
end

-- The server's clock in ms. Read it once, at the top of a script: TIME is frozen inside a script
-- on 7.2+ and advances on 7.0, so a second reading could disagree with the first.
local function server_now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Exactly `count` keys.
local function key_count(count)
  if #KEYS ~= count then
    fail('ARG', 'expected ' .. count .. ' key(s), got ' .. #KEYS)
  end
end

-- Between `low` and `high` ARGV entries; returns how many there are.
local function arg_count(low, high)
  local count = #ARGV
  if count < low or count > high then
    if low == high then
      fail('ARG', 'expected ' .. low .. ' argument(s), got ' .. count)
    end
    fail('ARG', 'expected ' .. low .. ' to ' .. high .. ' arguments, got ' .. count)
  end
  return count
end

-- Calls main() and turns a luasched failure into an error reply; any other error propagates.
-- A WRONGTYPE error of a redis.call (read.lua.j2: reads are plain redis.call, made before the
-- first write) becomes CORRUPT, naming the key: a key of the namespace holds another type than
-- the layout (something outside luasched wrote it) and nothing was written yet.
local function run(main)
  local ok, result = pcall(main)
  if ok then
    return result
  end
  if type(result) == 'table' and result.luasched_error then
    return redis.error_reply(result.luasched_error)
  end
  -- Redis 7+ raises redis.call errors as tables, 6.2 as strings.
  local message = type(result) == 'table' and result.err or result
  if type(message) == 'string' and string.find(message, 'WRONGTYPE', 1, true) then
    -- Name the first key of KEYS whose type is not the layout's (its --@key lines). Inline, not
    -- a helper: every local function costs a closure on every call, error or not.
    local layout, culprit = { 'zset', 'hash', 'zset', 'hash' }, 'a key'
    for position, key in ipairs(KEYS) do
      local actual = redis.call('TYPE', key)['ok']
      if actual ~= 'none' and actual ~= layout[position] then
        culprit = 'key ' .. show(key)
        break
      end
    end
    return redis.error_reply('LUASCHED_CORRUPT ' .. SCRIPT_NAME .. ': ' .. culprit
      .. ' holds another type than the layout')
  end
  error(result, 0)
end
-- ---------------------------------------------------------------------------------------------
-- pick (lua/include/pick.lua.j2): what the pick.* scripts share. Needs prelude.lua.j2.
-- Binds no KEYS: each pick script declares only the keys it touches and passes them here.
--
--   * Reads go through read(), which turns a wrong-type reply into CORRUPT; every key a pick
--     writes is read first, so no write can fail after another write was made.
--   * A candidate is live while its deadline (nodes:deadline) is strictly after the server's
--     now; the candidate sets (pick:util, pick:ring, pick:lru) also hold dead nodes until
--     nodes.sweep removes them, so walks skip them, examining at most SCAN_LIMIT members.
--   * Client randomness: ARGV integers in 0..2^53-1, reduced with math.fmod (exact for
--     doubles); the bias of r mod m is below m / 2^53, under 1e-5 for any m the registry allows.
-- ---------------------------------------------------------------------------------------------
local MAX_RANDOM = 9007199254740991
local fmod = math.fmod

-- ---------------------------------------------------------------------------------------------
-- read (lua/include/read.lua.j2): redis.call for what a script reads before its first write,
-- and for that first write itself. It is redis.call itself: a wrapper costs about a thousand
-- server instructions per call (docs/redis-notes.md). A WRONGTYPE error (a key of the namespace
-- holds another type than the layout: something outside luasched wrote it) is turned into
-- CORRUPT by run() (prelude.lua.j2), which names the key; it leaves every key as it was because
-- nothing was written yet. Any other error (OOM, NOPERM...) propagates unchanged. Scripts that
-- include this declare CORRUPT, which is what makes the renderer give run() that conversion.
-- ---------------------------------------------------------------------------------------------
local read = redis.call
-- An integer counter or load stored as a string (absent: 0); CORRUPT if it is not one.
local function stored_int(raw, what)
  if not raw then
    return 0
  end
  local value = tonumber(raw)
  if not value or value ~= math.floor(value) or value < 0 or value > MAX_SAFE_INTEGER then
    fail('CORRUPT', what .. ' holds ' .. show(raw) .. ', not an integer')
  end
  return value
end

-- ---------------------------------------------------------------------------------------------
-- pick_walk (lua/include/pick_walk.lua.j2): a bounded walk over a candidate zset that skips dead
-- nodes. Needs prelude.lua.j2 and pick.lua.j2. Candidate sets keep dead nodes until nodes.sweep,
-- so a walk examines at most SCAN_LIMIT (128) members and then fails with
-- SCANLIMIT (before any write) rather than run unbounded.
-- ---------------------------------------------------------------------------------------------
local SCAN_LIMIT = 128

-- Walks the zset `key` of indexes in rank order from rank `first` (wrapping past the end to
-- rank 0 when `wrap`), examining at most SCAN_LIMIT members and each member at most once.
-- For each live member calls accept(member, score): true takes it, 'stop' ends the walk.
-- Returns member, score of the taken one; or nil and why: 'end' (every member examined),
-- 'stop', or 'limit' (SCAN_LIMIT examined). Also returns how many live members it saw.
-- O(examined * log n): ZRANGE and ZMSCORE in growing chunks.
local function walk(key, deadline_key, now_ms, first, wrap, accept)
  local total = read('ZCARD', key)
  local budget = math.min(total, SCAN_LIMIT)
  local examined, live_seen, rank, chunk = 0, 0, first, 4
  while examined < budget do
    if rank >= total then
      if not wrap or first == 0 then
        break
      end
      rank = 0
    end
    local size = math.min(chunk, budget - examined, total - rank)
    if wrap and rank < first then
      size = math.min(size, first - rank)
    end
    local flat = read('ZRANGE', key, rank, rank + size - 1, 'WITHSCORES')
    local count = #flat / 2
    if count == 0 then
      break
    end
    local members = {}
    for position = 1, count do
      members[position] = flat[2 * position - 1]
    end
    local deadlines = read('ZMSCORE', deadline_key, unpack(members))
    for position = 1, count do
      examined = examined + 1
      local deadline = deadlines[position]
      if deadline and tonumber(deadline) > now_ms then
        live_seen = live_seen + 1
        local score = tonumber(flat[2 * position])
        local verdict = accept(members[position], score)
        if verdict == 'stop' then
          return nil, 'stop', live_seen
        elseif verdict then
          return members[position], score, live_seen
        end
      end
    end
    rank = rank + count
    chunk = chunk * 2
  end
  if examined >= SCAN_LIMIT and examined < total then
    return nil, 'limit', live_seen
  end
  return nil, 'end', live_seen
end


-- Fails for a walk of a strategy without capacity that took nothing: SCANLIMIT or NONODE.
local function fail_no_live(why)
  if why == 'limit' then
    fail('SCANLIMIT', 'the first ' .. SCAN_LIMIT .. ' candidates were all dead; sweep dead nodes')
  end
  fail('NONODE', 'no live node that is not draining')
end
local K_RING, K_STATE, K_DEADLINE, K_ID = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

-- ---------------------------------------------------------------------------------------------
-- pick_round_robin (lua/include/pick_round_robin.lua.j2): the round-robin pick, shared by
-- pick.round_robin and queue.dispatch. Needs prelude, pick and pick_walk; the includer binds
-- K_RING (pick:ring), K_STATE (pick:state), K_DEADLINE (nodes:deadline), K_ID (nodes:id).
--
-- The next live member of pick:ring after the cursor (the index of the last pick), wrapping;
-- the cursor moves to it. The cursor is an index, not a rank, so a join or leave changes only
-- that node's own turns.
-- ---------------------------------------------------------------------------------------------

-- Picks (reads only): answers the node id and its index (a member string). Then
-- round_robin_commit(index) moves the cursor. Fails NONODE or SCANLIMIT.
local function pick_round_robin(now_ms)
  local cursor = stored_int(read('HGET', K_STATE, 'cursor'), 'pick:state cursor')
  -- The rank of the first member after the cursor (indexes are their own scores).
  local first = read('ZCOUNT', K_RING, '-inf', decimal(cursor))
  local member, why = walk(K_RING, K_DEADLINE, now_ms, first, true, function()
    return true
  end)
  if not member then
    fail_no_live(why)
  end
  local node_id = read('HGET', K_ID, member)
  if not node_id then
    fail('CORRUPT', 'index ' .. show(member) .. ' of pick:ring has no node id')
  end
  return node_id, member
end

-- The pick's one write: the cursor (pick:state was read by pick_round_robin). Cannot fail.
local function round_robin_commit(member)
  redis.call('HSET', K_STATE, 'cursor', member)
end
local function main()
  key_count(4)
  arg_count(0, 0)
  local node_id, member = pick_round_robin(server_now_ms())
  round_robin_commit(member)
  return node_id
end

return run(main)
