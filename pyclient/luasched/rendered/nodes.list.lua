--@script     nodes.list
--@summary    Every registered node with its weight, capacity, draining flag, liveness, deadline, slot count and
--@+          metadata, in index order, with the server's clock. Reads only.
--@key        node_index  hash    luasched:{ns}:nodes:index -- node id -> its index ("1".."65535").
--@key        node_id     hash    luasched:{ns}:nodes:id -- index -> node id.
--@key        weight      hash    luasched:{ns}:nodes:weight -- index -> weight.
--@key        capacity    hash    luasched:{ns}:nodes:capacity -- index -> capacity (absent: unlimited).
--@key        meta        hash    luasched:{ns}:nodes:meta -- index -> opaque metadata (absent: empty).
--@key        deadline    zset    luasched:{ns}:nodes:deadline -- index scored by its heartbeat deadline
--@+          (server time, ms; +inf: no deadline). A node is live while deadline > now.
--@key        draining    set     luasched:{ns}:nodes:draining -- indexes of draining nodes.
--@key        free        zset    luasched:{ns}:nodes:free -- indexes of removed nodes, reused lowest first.
--@key        slot_table  string  luasched:{ns}:slots:owner -- 32768 bytes (or absent): slot s at byte
--@+          offset 2s, the big-endian 16-bit index of its owner, 0 = no owner.
--@key        load        hash    luasched:{ns}:pick:load -- index -> current load charged by pick.* (absent: 0).
--@key        util        zset    luasched:{ns}:pick:util -- registered, non-draining indexes scored by
--@+          utilization load/capacity (see pick.least_loaded).
--@key        ring        zset    luasched:{ns}:pick:ring -- registered, non-draining indexes scored by index.
--@key        lru         zset    luasched:{ns}:pick:lru -- registered, non-draining indexes scored by the
--@+          logical clock of their last pick (0: not picked since eligible).
--@key        weighted    zset    luasched:{ns}:pick:weighted -- live eligible indexes scored by cumulative
--@+          weight (absent: to be rebuilt by pick.weighted; deleted on any membership or weight change).
--@reply      array{now_ms:int, node...}  Then one entry per node: array{node_id:string, weight:int,
--@+          capacity:int (-1: unlimited), draining:int:0..1, live:int:0..1, deadline_ms:int (-1: none),
--@+          slots:int:0..16384, meta:string}. live = deadline_ms is after now_ms.
--@error      ARG  Not 14 keys, or any argument.
--@error      CORRUPT  The slot table has another length than 32768 bytes.
--@complexity O(n log n + 16384) for n registered nodes (reply size O(n + metadata))
--@since      6.2
--@flags      no-writes
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
local SCRIPT_NAME = 'nodes.list'
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
    local layout, culprit = { 'hash', 'hash', 'hash', 'hash', 'hash', 'zset', 'set', 'zset', 'string', 'hash', 'zset', 'zset', 'zset', 'zset' }, 'a key'
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
-- registry (lua/include/registry.lua.j2): the node registry and slot table of one namespace.
--
-- Every nodes.* script and slots.rebalance/owner/owners/owner_of_slot take the same 14 KEYS, in
-- this order (all under the namespace's hash tag, so one cluster slot):
--   1 nodes:index    HASH  node id -> index        5 nodes:meta      HASH  index -> meta
--   2 nodes:id       HASH  index -> node id        6 nodes:deadline  ZSET  index by deadline ms
--   3 nodes:weight   HASH  index -> weight         7 nodes:draining  SET   indexes
--   4 nodes:capacity HASH  index -> capacity       8 nodes:free      ZSET  reusable indexes
--   9 slots:owner    STRING the slot table
--  10 pick:load      HASH  index -> load          12 pick:ring       ZSET  eligible, by index
--  11 pick:util      ZSET  eligible, by load/cap  13 pick:lru        ZSET  eligible, by last pick
--  14 pick:weighted  ZSET  cumulative weights (lazy)
-- Keys 10..14 are the pick.* scripts' view of the registry (lua/include/pick_registry.lua.j2).
-- Node ids are arbitrary bytes: they are only ever hash fields and values, never part of a key
-- name. Indexes are decimal strings "1".."65535" wherever they are a field or member.
--
-- Invariants the scripts rely on (and keep):
--   * Allocated indexes are exactly 1..HLEN(nodes:id)+ZCARD(nodes:free): the registered ones
--     (nodes:id) plus the released ones (nodes:free). nodes:index and nodes:id are inverse maps;
--     every registered index has a weight and a deadline (score +inf: no deadline).
--   * The slot table is absent (no slot owned) or exactly 32768 bytes: slot s (0-based) is bytes
--     2s and 2s+1 (0-based offsets), the big-endian index of its owner, 0 = no owner.
--   * Every non-zero entry of the table is a registered index: remove and sweep clear (or
--     reassign) a node's slots in the same call that releases its index, so a reused index
--     never inherits slots.
--   * Liveness: a node is live while its deadline is strictly after the server's now.
-- ---------------------------------------------------------------------------------------------
local K_INDEX, K_ID, K_WEIGHT, K_CAPACITY, K_META = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_DEADLINE, K_DRAINING, K_FREE, K_SLOTS = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local K_LOAD, K_UTIL, K_RING, K_LRU, K_WEIGHTED = KEYS[10], KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local REGISTRY_KEY_COUNT = 14
local SLOT_COUNT = 16384
local TABLE_BYTES = 2 * SLOT_COUNT
-- Slots handled per string.byte / string.char call: 2 values per slot, far below the 8000
-- values unpack and a call's arguments can take.
local SLOTS_PER_CHUNK = 2048
local MAX_NODES = 65535
local floor = math.floor

-- ---------------------------------------------------------------------------------------------
-- slot_table (lua/include/slot_table.lua.j2): whole-table reads and writes, and the layout
-- check of scripts that write more than one key. Needs include/registry.lua.j2.
-- Raises CORRUPT (a registry key of another type, or a table of another length: changed by
-- something other than luasched).
-- ---------------------------------------------------------------------------------------------

-- The whole slot table as an array: owners[slot + 1] = owner index (0 = none). O(16384).
local function read_owners()
  local raw = redis.call('GET', K_SLOTS)
  local owners = {}
  if not raw then
    for slot = 1, SLOT_COUNT do
      owners[slot] = 0
    end
    return owners
  end
  if #raw ~= TABLE_BYTES then
    fail('CORRUPT', 'the slot table is ' .. #raw .. ' bytes, expected ' .. TABLE_BYTES)
  end
  local byte = string.byte
  for first = 1, SLOT_COUNT, SLOTS_PER_CHUNK do
    -- first is a 1-based slot number; its high byte is at 1-based position 2 * first - 1.
    local bytes = { byte(raw, 2 * first - 1, 2 * (first + SLOTS_PER_CHUNK - 1)) }
    for offset = 0, SLOTS_PER_CHUNK - 1 do
      owners[first + offset] = bytes[2 * offset + 1] * 256 + bytes[2 * offset + 2]
    end
  end
  return owners
end

-- How many slots each index owns: counts[index] (nil = none). O(16384).
local function count_owned(owners)
  local counts = {}
  for slot = 1, SLOT_COUNT do
    local owner = owners[slot]
    if owner ~= 0 then
      counts[owner] = (counts[owner] or 0) + 1
    end
  end
  return counts
end
-- A hash keyed by index as a Lua table index (number) -> value.
local function by_index(key)
  local flat = redis.call('HGETALL', key)
  local values = {}
  for position = 1, #flat, 2 do
    values[tonumber(flat[position])] = flat[position + 1]
  end
  return values
end

local function main()
  key_count(REGISTRY_KEY_COUNT)
  arg_count(0, 0)
  local now_ms = server_now_ms()
  local ids = by_index(K_ID)
  local weights = by_index(K_WEIGHT)
  local capacities = by_index(K_CAPACITY)
  local metas = by_index(K_META)
  local deadlines = {}
  local flat = redis.call('ZRANGE', K_DEADLINE, 0, -1, 'WITHSCORES')
  for position = 1, #flat, 2 do
    deadlines[tonumber(flat[position])] = tonumber(flat[position + 1])
  end
  local draining = {}
  for _, member in ipairs(redis.call('SMEMBERS', K_DRAINING)) do
    draining[tonumber(member)] = true
  end
  local counts = count_owned(read_owners())

  local indexes = {}
  for index in pairs(ids) do
    indexes[#indexes + 1] = index
  end
  table.sort(indexes)
  local reply = { now_ms }
  for _, index in ipairs(indexes) do
    local deadline = deadlines[index]
    local live = deadline ~= nil and deadline > now_ms
    local finite = deadline ~= nil and deadline ~= math.huge
    reply[#reply + 1] = {
      ids[index],
      tonumber(weights[index]) or 1,
      tonumber(capacities[index]) or -1,
      draining[index] and 1 or 0,
      live and 1 or 0,
      finite and deadline or -1,
      counts[index] or 0,
      metas[index] or '',
    }
  end
  return reply
end

return run(main)
