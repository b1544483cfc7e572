--@script     pick.smooth_weighted
--@summary    Smooth weighted round-robin (nginx): deterministic and interleaved; over any window of W picks
--@+          (W = total weight, membership unchanged) each live, non-draining node is picked exactly weight
--@+          times (weights 5,1,1 give a a b a c a a). Each pick adds every node's weight to its current
--@+          value, takes the largest (lowest index on a tie) and subtracts W from it. The state is reset to
--@+          zero whenever the set of candidates or a weight differs from the state's (join, leave, drain,
--@+          heartbeat lapse or revival, weight change). Costs O(n) per pick: it reads every candidate and
--@+          rewrites the state, so it refuses more than 2000 candidates.
--@key        smooth    string  luasched:{ns}:pick:smooth -- the state: a MessagePack array {index, weight,
--@+          current, ...} of every candidate of the last pick, in index order.
--@key        deadline  zset    luasched:{ns}:nodes:deadline -- index scored by its heartbeat deadline
--@+          (server ms); live while deadline > now.
--@key        draining  set     luasched:{ns}:nodes:draining -- indexes of draining nodes.
--@key        weight    hash    luasched:{ns}:nodes:weight -- index -> weight.
--@key        node_id   hash    luasched:{ns}:nodes:id -- index -> node id.
--@reply      string  The chosen node's id.
--@error      ARG  Not 5 keys, or any argument.
--@error      NONODE  No node is live and not draining; nothing changed.
--@error      TOOMANY  More than 2000 live, non-draining nodes; nothing changed.
--@error      CORRUPT  A key holds another type or shape than the layout; nothing changed.
--@complexity O(n log n) for n registered nodes (every candidate is read and the state rewritten)
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
local SCRIPT_NAME = 'pick.smooth_weighted'
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
    local layout, culprit = { 'string', 'zset', 'set', 'hash', 'hash' }, 'a key'
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
local K_SMOOTH, K_DEADLINE, K_DRAINING, K_WEIGHT, K_ID = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local SMOOTH_MAX_NODES = 2000

-- The current values of the stored state if it is for exactly these indexes and weights, else
-- nil (a state that does not decode counts as another state: reset).
local function stored_currents(raw, indexes, weights)
  if not raw then
    return nil
  end
  local ok, state = pcall(cmsgpack.unpack, raw)
  if not ok or type(state) ~= 'table' or #state ~= 3 * #indexes then
    return nil
  end
  local currents = {}
  for position = 1, #indexes do
    local base = 3 * (position - 1)
    local current = state[base + 3]
    if state[base + 1] ~= indexes[position] or state[base + 2] ~= weights[position]
      or type(current) ~= 'number' then
      return nil
    end
    currents[position] = current
  end
  return currents
end

local function main()
  key_count(5)
  arg_count(0, 0)
  local now_ms = server_now_ms()
  local indexes, weights = eligible_weights(K_DEADLINE, K_DRAINING, K_WEIGHT, now_ms)
  if #indexes == 0 then
    fail('NONODE', 'no live node that is not draining')
  end
  if #indexes > SMOOTH_MAX_NODES then
    fail('TOOMANY', #indexes .. ' live nodes; smooth weighted round-robin supports at most '
      .. SMOOTH_MAX_NODES)
  end
  local currents = stored_currents(read('GET', K_SMOOTH), indexes, weights)
  if not currents then
    currents = {}
    for position = 1, #indexes do
      currents[position] = 0
    end
  end
  -- |current| <= total weight <= 2000000000: exact integers.
  local total, best = 0, 1
  for position = 1, #indexes do
    currents[position] = currents[position] + weights[position]
    total = total + weights[position]
    if currents[position] > currents[best] then
      best = position
    end
  end
  currents[best] = currents[best] - total
  local node_id = read('HGET', K_ID, indexes[best])
  if not node_id then
    fail('CORRUPT', 'index ' .. indexes[best] .. ' has no node id')
  end
  local state = {}
  for position = 1, #indexes do
    state[3 * position - 2] = indexes[position]
    state[3 * position - 1] = weights[position]
    state[3 * position] = currents[position]
  end
  -- The only write (GET above proved the key a string or absent).
  redis.call('SET', K_SMOOTH, cmsgpack.pack(state))
  return node_id
end

return run(main)
