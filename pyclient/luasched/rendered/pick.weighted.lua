--@script     pick.weighted
--@summary    Weighted random pick: each live, non-draining node is chosen with probability weight / total
--@+          weight, from the client's random integer, in O(log n): pick:weighted holds the live eligible
--@+          nodes scored by cumulative weight, and the pick is the first member whose cumulative weight
--@+          exceeds random mod total. Changes nothing, except to rebuild that table (O(n log n), once after
--@+          each change of membership, weight, drain flag or revival, which delete it; or when the draw lands
--@+          on a node that died since it was built, then the draw is made again with random2).
--@key        weighted  zset    luasched:{ns}:pick:weighted -- live eligible indexes scored by cumulative
--@+          weight (absent: to be rebuilt).
--@key        deadline  zset    luasched:{ns}:nodes:deadline -- index scored by its heartbeat deadline
--@+          (server ms); live while deadline > now.
--@key        draining  set     luasched:{ns}:nodes:draining -- indexes of draining nodes.
--@key        weight    hash    luasched:{ns}:nodes:weight -- index -> weight.
--@key        node_id   hash    luasched:{ns}:nodes:id -- index -> node id.
--@arg        random1  int:0..9007199254740991  A uniformly random integer drawn by the client.
--@arg        random2  int:0..9007199254740991  Another one, used only when the table is rebuilt.
--@reply      string  The chosen node's id.
--@error      ARG  Not 5 keys or 2 arguments, or an argument out of its range.
--@error      NONODE  No node is live and not draining; nothing changed.
--@error      CORRUPT  A key holds another type or shape than the layout; nothing changed.
--@complexity O(log n) for n eligible nodes; O(n log n) for the first pick after a change (the rebuild)
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
local SCRIPT_NAME = 'pick.weighted'
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

-- ARGV[index] as an integer in [low, high].
local function arg_int(index, name, low, high)
  local raw = ARGV[index]
  if raw == nil or #raw > 17 or not string.find(raw, '^%-?%d+$') then
    fail('ARG', name .. ' must be an integer, got ' .. show(raw))
  end
  local value = tonumber(raw)
  if value < low or value > high then
    fail('ARG', name .. ' must be between ' .. decimal(low) .. ' and ' .. decimal(high) .. ', got ' .. raw)
  end
  return value
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
    local layout, culprit = { 'zset', 'zset', 'set', 'hash', 'hash' }, 'a key'
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

-- Whether `index` (a member string) is live at now_ms.
local function is_live(deadline_key, index, now_ms)
  local deadline = read('ZSCORE', deadline_key, index)
  return deadline and tonumber(deadline) > now_ms
end

-- The node id of `index` in the nodes:id hash `id_key`; CORRUPT if the registry lost it.
local function node_id_of(id_key, index)
  local node_id = read('HGET', id_key, index)
  if not node_id then
    fail('CORRUPT', 'index ' .. show(index) .. ' has no node id')
  end
  return node_id
end
-- ---------------------------------------------------------------------------------------------
-- pick_eligible (lua/include/pick_eligible.lua.j2): the live, non-draining nodes and their
-- weights, read in full (O(n log n)). Needs prelude and pick. Used where a strategy needs every
-- candidate: pick.weighted when it rebuilds its table, pick.smooth_weighted on every pick.
-- ---------------------------------------------------------------------------------------------

-- Indexes (numbers, ascending) of the live, non-draining nodes, and their weights (numbers).
local function eligible_weights(deadline_key, draining_key, weight_key, now_ms)
  local live = read('ZRANGEBYSCORE', deadline_key, '(' .. decimal(now_ms), '+inf')
  local draining = {}
  for _, member in ipairs(read('SMEMBERS', draining_key)) do
    draining[member] = true
  end
  local indexes = {}
  for _, member in ipairs(live) do
    if not draining[member] then
      indexes[#indexes + 1] = tonumber(member)
    end
  end
  table.sort(indexes)
  local weights = {}
  for first = 1, #indexes, 1000 do
    local last = math.min(first + 999, #indexes)
    local chunk = read('HMGET', weight_key, unpack(indexes, first, last))
    for offset = 1, last - first + 1 do
      -- A registered index always has a weight (registry invariant).
      local weight = tonumber(chunk[offset])
      if not weight or weight < 1 or weight ~= math.floor(weight) then
        fail('CORRUPT', 'index ' .. indexes[first + offset - 1] .. ' has weight ' .. show(chunk[offset]))
      end
      weights[first + offset - 1] = weight
    end
  end
  return indexes, weights
end
local K_WEIGHTED, K_DEADLINE, K_DRAINING, K_WEIGHT, K_ID = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

-- ---------------------------------------------------------------------------------------------
-- pick_weighted (lua/include/pick_weighted.lua.j2): the weighted random pick, shared by
-- pick.weighted and queue.dispatch. Needs prelude, pick and pick_eligible; the includer binds
-- K_WEIGHTED (pick:weighted), K_DEADLINE, K_DRAINING, K_WEIGHT, K_ID (nodes:*).
--
-- pick:weighted holds the live eligible indexes scored by cumulative weight; the pick is the
-- first member whose cumulative weight exceeds random1 mod total (node i covers
-- [cumulative(i-1), cumulative(i))). When the table is absent, or the draw lands on a node that
-- died since it was built, it is rebuilt (O(n log n)) and the draw is made again with random2,
-- so the probability stays exactly weight / total over the live nodes.
-- ---------------------------------------------------------------------------------------------

-- Picks (reads only): answers the node id, its index (a member string) and the rebuilt table
-- (nil when the stored one was used), which weighted_commit() writes. Fails NONODE.
local function pick_weighted(random1, random2, now_ms)
  local top = read('ZRANGE', K_WEIGHTED, -1, -1, 'WITHSCORES')
  if #top == 2 then
    local draw = fmod(random1, tonumber(top[2]))
    local member = read('ZRANGEBYSCORE', K_WEIGHTED, '(' .. decimal(draw), '+inf',
      'LIMIT', 0, 1)[1]
    if is_live(K_DEADLINE, member, now_ms) then
      return node_id_of(K_ID, member), member
    end
  end

  -- Rebuild from the live, non-draining nodes (all reads first), then draw with random2.
  local indexes, weights = eligible_weights(K_DEADLINE, K_DRAINING, K_WEIGHT, now_ms)
  if #indexes == 0 then
    fail('NONODE', 'no live node that is not draining')
  end
  local cumulative, total = {}, 0
  for position = 1, #indexes do
    -- total <= 65535000000 < 2^53: exact.
    total = total + weights[position]
    cumulative[position] = total
  end
  local draw = fmod(random2, total)
  local low, high = 1, #indexes
  while low < high do
    local middle = math.floor((low + high) / 2)
    if cumulative[middle] > draw then
      high = middle
    else
      low = middle + 1
    end
  end
  return node_id_of(K_ID, indexes[low]), decimal(indexes[low]), { indexes, cumulative }
end

-- Writes the table pick_weighted rebuilt (pick:weighted was read there). Cannot fail.
local function weighted_commit(rebuilt)
  if not rebuilt then
    return
  end
  local indexes, cumulative = rebuilt[1], rebuilt[2]
  redis.call('DEL', K_WEIGHTED)
  for first = 1, #indexes, 1000 do
    local arguments = {}
    for position = first, math.min(first + 999, #indexes) do
      arguments[#arguments + 1] = cumulative[position]
      arguments[#arguments + 1] = indexes[position]
    end
    redis.call('ZADD', K_WEIGHTED, unpack(arguments))
  end
end
local function main()
  key_count(5)
  arg_count(2, 2)
  local random1 = arg_int(1, 'random1', 0, MAX_RANDOM)
  local random2 = arg_int(2, 'random2', 0, MAX_RANDOM)
  local node_id, _, rebuilt = pick_weighted(random1, random2, server_now_ms())
  weighted_commit(rebuilt)
  return node_id
end

return run(main)
