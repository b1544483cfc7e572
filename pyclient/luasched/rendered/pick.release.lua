--@script     pick.release
--@summary    Gives back `cost` of a node's load charged by pick.least_loaded or pick.two_choices; the load
--@+          never goes below zero (releasing more than was charged leaves 0). Works on draining and dead
--@+          (not yet swept) nodes too; their utilization is updated where they are candidates.
--@key        node_index  hash    luasched:{ns}:nodes:index -- node id -> its index.
--@key        load        hash    luasched:{ns}:pick:load -- index -> current load (absent: 0).
--@key        capacity    hash    luasched:{ns}:nodes:capacity -- index -> capacity (absent: unlimited).
--@key        util        zset    luasched:{ns}:pick:util -- registered, non-draining indexes scored by
--@+          utilization load/capacity.
--@arg        node_id  string:1..1024  The node id.
--@arg        cost     int:1..1000000000000  The load to give back.
--@reply      int  The node's load after the release (>= 0).
--@error      ARG  Not 4 keys or 2 arguments, or an argument out of its range.
--@error      NOSUCHNODE  The node is not registered (removed or swept: its load went with it).
--@error      CORRUPT  A key holds another type or shape than the layout; nothing changed.
--@complexity O(log n) for n eligible nodes
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
local SCRIPT_NAME = 'pick.release'
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

-- ARGV[index] as a byte string whose length is in [min_length, max_length].
local function arg_string(index, name, min_length, max_length)
  local raw = ARGV[index]
  if raw == nil or #raw < min_length or #raw > max_length then
    fail('ARG', name .. ' must be ' .. min_length .. ' to ' .. max_length .. ' bytes long, got '
      .. (raw == nil and 'nothing' or (#raw .. ' bytes')))
  end
  return raw
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
    local layout, culprit = { 'hash', 'hash', 'hash', 'zset' }, 'a key'
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
-- pick_score (lua/include/pick_score.lua.j2): a node's utilization score, the one formula shared
-- by the nodes.* scripts (which keep pick:util in step with the registry) and the pick.* scripts.
--
--   utilization = load / capacity, a double; ZADD gets it as '%.17g', which round-trips exactly,
--   so equal fractions (1/2, 2/4) get bit-identical scores and tie.
--   A node with unlimited capacity counts as capacity UNLIMITED_CAPACITY (2^50): it is never
--   full and ranks by its load among the unlimited ones, ahead of any busy limited node.
--   Capacity 0: the node never takes work; its score is 1 (full).
--   Full for a cost: load + cost > capacity. A node with score < 1 has room for cost 1 (integer
--   load < capacity), one with score >= 1 has room for no cost: so when the node with the
--   lowest score is full for cost 1, every node is.
-- Loads stay <= capacity <= 2^50 (a pick never charges past capacity), so integers stay exact.
-- ---------------------------------------------------------------------------------------------
local UNLIMITED_CAPACITY = 1125899906842624

-- The effective capacity of a raw nodes:capacity value (nil/false = unlimited).
local function effective_capacity(raw)
  if not raw then
    return UNLIMITED_CAPACITY
  end
  return tonumber(raw)
end

-- The pick:util score (a string for ZADD) of `load` on `capacity` (effective capacity).
local function utilization_score(load, capacity)
  if capacity <= 0 then
    return '1'
  end
  return string.format('%.17g', load / capacity)
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

-- The node id of `index` in the nodes:id hash `id_key`; CORRUPT if the registry lost it.
local function node_id_of(id_key, index)
  local node_id = read('HGET', id_key, index)
  if not node_id then
    fail('CORRUPT', 'index ' .. show(index) .. ' has no node id')
  end
  return node_id
end
local K_INDEX, K_LOAD, K_CAPACITY, K_UTIL = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_ID = nil  -- pick_charge's charge() is not used here (no node id is read)

-- ---------------------------------------------------------------------------------------------
-- pick_charge (lua/include/pick_charge.lua.j2): a node's load, charged and given back; shared by
-- the charging picks (pick_load), pick.release and the dispatch scripts (queue.dispatch and the
-- node-queue scripts, which charge every dispatched task to its node). Needs prelude, pick_score
-- and pick. The includer binds K_LOAD (pick:load), K_CAPACITY (nodes:capacity), K_UTIL
-- (pick:util) and K_ID (nodes:id).
--
--   * Reads first: load_and_capacity() and release_plan() only read (and so check the types of
--     the keys that charge() and release() write); charge() and release() only write (charge()
--     first runs the includer's before_charge read, if any).
--   * pick:util is written with XX: a draining node is no candidate and stays out of it (its
--     load is still kept, for the release).
-- ---------------------------------------------------------------------------------------------

-- A read of the includer about the node a charge goes to, run by charge() with the node id
-- before its writes (nil: none): queue.dispatch and queue.redispatch look at that node's
-- waiting marker there (include/dispatch_pick.lua.j2), before anything is written.
local before_charge = nil

-- Load and effective capacity of `index`, and its raw capacity (nil: unlimited).
local function load_and_capacity(index)
  local load = stored_int(read('HGET', K_LOAD, index), 'pick:load')
  local capacity_raw = read('HGET', K_CAPACITY, index)
  return load, effective_capacity(capacity_raw), capacity_raw
end

-- Charges `cost` to `index` and answers {node_id, load, capacity (-1: unlimited)}. Reads the
-- node id first unless the caller passes it (a caller that has written already must: no read
-- after the first write); its writes come last and cannot fail (both keys were read by
-- load_and_capacity).
local function charge(index, load, capacity, capacity_raw, cost, known_node_id)
  local node_id = known_node_id or node_id_of(K_ID, index)
  if before_charge then
    before_charge(node_id)
  end
  local new_load = load + cost
  redis.call('HSET', K_LOAD, index, decimal(new_load))
  redis.call('ZADD', K_UTIL, 'XX', utilization_score(new_load, capacity), index)
  return { node_id, new_load, capacity_raw and capacity or -1 }
end

-- What giving back `cost` of `index`'s load will write: a table for release(). Reads only.
local function release_plan(index, cost)
  local load, capacity = load_and_capacity(index)
  read('ZSCORE', K_UTIL, index)  -- a wrong type fails here, before the first write
  return { index = index, load = math.max(0, load - cost), capacity = capacity }
end

-- Writes a release_plan (the load never goes below 0; 0 is stored as no field). Cannot fail.
local function release(plan)
  if plan.load == 0 then
    redis.call('HDEL', K_LOAD, plan.index)
  else
    redis.call('HSET', K_LOAD, plan.index, decimal(plan.load))
  end
  redis.call('ZADD', K_UTIL, 'XX', utilization_score(plan.load, plan.capacity), plan.index)
  return plan.load
end
local function main()
  key_count(4)
  arg_count(2, 2)
  local node_id = arg_string(1, 'node_id', 1, 1024)
  local cost = arg_int(2, 'cost', 1, 1000000000000)
  local index = read('HGET', K_INDEX, node_id)
  if not index then
    fail('NOSUCHNODE', 'node ' .. show(node_id) .. ' is not registered')
  end
  return release(release_plan(index, cost))
end

return run(main)
