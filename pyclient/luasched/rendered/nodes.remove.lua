--@script     nodes.remove
--@summary    Removes a node from the registry at once, live or not, and releases its index for reuse.
--@+          Its slots become ownerless (lookups answer "no live owner" for them) until slots.rebalance or
--@+          a nodes.sweep that removes a node hands them to the eligible nodes; no other slot changes.
--@+          Removing a node that is not registered changes nothing and answers {0, 0} (so a retried call
--@+          is harmless).
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
--@arg        node_id  string:1..1024  The node id.
--@reply      array{removed:int:0..1, slots_released:int:0..16384}  Whether the node was registered, and how many
--@+          slots it owned (now ownerless).
--@error      ARG  Not 14 keys or 1 argument, or an argument out of its range.
--@error      CORRUPT  A registry key holds another type or shape than the layout; nothing changed.
--@complexity O(16384) for the slot table scan, plus O(log n)
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
local SCRIPT_NAME = 'nodes.remove'
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

-- The index (a number) of a registered node id, or nil.
local function index_of(node_id)
  local index = redis.call('HGET', K_INDEX, node_id)
  return index and tonumber(index) or nil
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

-- ---------------------------------------------------------------------------------------------
-- pick_registry (lua/include/pick_registry.lua.j2): how the nodes.* scripts keep the pick keys
-- (KEYS 10..14 of the registry) in step with the registry. Needs registry.lua.j2 and
-- pick_score.lua.j2. Every function here only writes (calls that cannot fail on keys of the
-- layout's types, which check_layout or an earlier read has established).
--
-- Invariants the pick.* scripts rely on:
--   * pick:util, pick:ring and pick:lru hold exactly the registered, non-draining indexes (live
--     or dead: liveness changes with time alone, so the pick scripts check it at pick time).
--   * pick:util scores are utilization_score(load, capacity) of the node's current load and
--     capacity; pick:ring scores are the index itself; pick:lru scores are the logical clock
--     of the node's last pick (0: never picked since it became eligible).
--   * pick:load holds a positive load for registered indexes only (absent = 0): remove and
--     sweep delete it with the index, so a reused index starts at load 0.
--   * pick:weighted is absent or was built from the eligible, live nodes and their weights
--     after the last change of membership, weight, drain flag or revival: every such change
--     deletes it (pick.weighted rebuilds it, and also when it lands on a node that died since).
-- ---------------------------------------------------------------------------------------------

-- A node stops being eligible (draining); its load stays, for pick.release.
local function pick_leave(index)
  redis.call('ZREM', K_UTIL, index)
  redis.call('ZREM', K_RING, index)
  redis.call('ZREM', K_LRU, index)
end

-- A node is removed: not eligible, and its load is forgotten with its index.
local function pick_forget(index)
  pick_leave(index)
  redis.call('HDEL', K_LOAD, index)
end

-- Membership, a weight or a liveness changed: the cumulative weights must be rebuilt.
local function pick_invalidate()
  redis.call('DEL', K_WEIGHTED)
end

-- ---------------------------------------------------------------------------------------------
-- slot_table (lua/include/slot_table.lua.j2): whole-table reads and writes, and the layout
-- check of scripts that write more than one key. Needs include/registry.lua.j2.
-- Raises CORRUPT (a registry key of another type, or a table of another length: changed by
-- something other than luasched).
-- ---------------------------------------------------------------------------------------------

-- Fails with CORRUPT unless every registry key is absent or of its layout type, and the slot
-- table is absent or 32768 bytes. Scripts that write more than one key call it before their
-- first write, so no write can fail on a wrong type after another write was made.
local function check_layout()
  local expected = {
    { K_INDEX, 'hash' }, { K_ID, 'hash' }, { K_WEIGHT, 'hash' }, { K_CAPACITY, 'hash' },
    { K_META, 'hash' }, { K_DEADLINE, 'zset' }, { K_DRAINING, 'set' }, { K_FREE, 'zset' },
    { K_SLOTS, 'string' }, { K_LOAD, 'hash' }, { K_UTIL, 'zset' }, { K_RING, 'zset' },
    { K_LRU, 'zset' }, { K_WEIGHTED, 'zset' },
  }
  for position, entry in ipairs(expected) do
    local found = redis.call('TYPE', entry[1]).ok
    if found ~= 'none' and found ~= entry[2] then
      fail('CORRUPT', 'KEYS[' .. position .. '] holds a ' .. found .. ', expected a ' .. entry[2])
    end
  end
  local length = redis.call('STRLEN', K_SLOTS)
  if length ~= 0 and length ~= TABLE_BYTES then
    fail('CORRUPT', 'the slot table is ' .. length .. ' bytes, expected ' .. TABLE_BYTES)
  end
end

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

-- Writes the whole table from an owners array (one SET of 32768 bytes).
local function write_owners(owners)
  local parts = {}
  local char = string.char
  for first = 1, SLOT_COUNT, SLOTS_PER_CHUNK do
    local bytes = {}
    for offset = 0, SLOTS_PER_CHUNK - 1 do
      local owner = owners[first + offset]
      bytes[2 * offset + 1] = floor(owner / 256)
      bytes[2 * offset + 2] = owner % 256
    end
    parts[#parts + 1] = char(unpack(bytes))
  end
  redis.call('SET', K_SLOTS, table.concat(parts))
end

local function main()
  key_count(REGISTRY_KEY_COUNT)
  arg_count(1, 1)
  local node_id = arg_string(1, 'node_id', 1, 1024)
  check_layout()
  local index = index_of(node_id)
  if not index then
    return { 0, 0 }
  end
  local owners = read_owners()
  local released = 0
  for slot = 1, SLOT_COUNT do
    if owners[slot] == index then
      owners[slot] = 0
      released = released + 1
    end
  end

  -- Writes: nothing below can fail (types and table checked).
  redis.call('HDEL', K_INDEX, node_id)
  redis.call('HDEL', K_ID, index)
  redis.call('HDEL', K_WEIGHT, index)
  redis.call('HDEL', K_CAPACITY, index)
  redis.call('HDEL', K_META, index)
  redis.call('ZREM', K_DEADLINE, index)
  redis.call('SREM', K_DRAINING, index)
  -- The table no longer names the index, so it may be reused (registry invariant).
  redis.call('ZADD', K_FREE, index, index)
  pick_forget(index)
  pick_invalidate()
  if released > 0 then
    write_owners(owners)
  end
  return { 1, released }
end

return run(main)
