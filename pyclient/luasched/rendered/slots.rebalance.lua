--@script     slots.rebalance
--@summary    Assigns all 16384 slots to the live, non-draining nodes in proportion to their weights, moving as
--@+          few slots as possible. Each node ends with floor or ceil of 16384 * weight / total weight (within
--@+          one slot of its exact share); a slot stays with its owner while the owner is eligible and under
--@+          its quota; only orphaned slots, slots of dead or draining nodes, and the surplus of over-quota
--@+          nodes move. Deterministic: the same registry and table give the same result on any server.
--@+          Dead nodes stay registered (nodes.sweep removes them) but lose their slots.
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
--@reply      array{moved:int:0..16384, counts:array}  moved = slots that changed owner; counts = flat
--@+          array{node_id:string, slots:int, ...} of every eligible node (index order) with its slot count.
--@error      ARG  Not 14 keys, or any argument.
--@error      NONODE  No node is live and not draining; nothing changed.
--@error      CORRUPT  The slot table has another length than 32768 bytes; nothing changed.
--@complexity O(16384 + n log n) for n live nodes; writes the 32 KiB table only if a slot moved
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
local SCRIPT_NAME = 'slots.rebalance'
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

-- The indexes (numbers, ascending) of live nodes: deadline strictly after now.
local function live_indexes(now_ms)
  local members = redis.call('ZRANGEBYSCORE', K_DEADLINE, '(' .. decimal(now_ms), '+inf')
  local indexes = {}
  for position, member in ipairs(members) do
    indexes[position] = tonumber(member)
  end
  table.sort(indexes)
  return indexes
end

-- HMGET of `indexes` (numbers) on a hash keyed by index, in chunks; values[position] (false
-- where absent).
local function hash_values(key, indexes)
  local values = {}
  for first = 1, #indexes, 1000 do
    local last = math.min(first + 999, #indexes)
    local chunk = redis.call('HMGET', key, unpack(indexes, first, last))
    for offset = 1, last - first + 1 do
      values[first + offset - 1] = chunk[offset]
    end
  end
  return values
end
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
-- ---------------------------------------------------------------------------------------------
-- rebalance (lua/include/rebalance.lua.j2): the weighted, minimal-movement slot assignment.
-- Needs include/registry.lua.j2. Used by slots.rebalance and nodes.sweep (one piece of code
-- for one idea). Reads only; the caller writes the table it returns.
--
-- Eligible nodes: live (deadline > now) and not draining. With weights w and W = sum of w:
--   quota = floor(16384 * w / W), plus one slot for the `leftover` = 16384 - sum(floors)
--   nodes chosen among those with a non-zero remainder (so every quota is the floor or the
--   ceiling of the exact share 16384 * w / W, i.e. within one slot of it). The extra slots go
--   first to nodes that already own more than their floor (each of those keeps a slot that
--   would otherwise move), then by largest remainder, then by lowest index: a deterministic
--   total order, so equal inputs give equal tables on every server.
-- Movement: a slot stays where it is if its owner is eligible and still under quota (slots
-- scanned in ascending order); every other slot (orphaned, owned by an ineligible node, or
-- surplus of an over-quota node) moves, in ascending slot order, to eligible nodes below their
-- quota, in ascending index order. Hence moved = sum of surpluses + orphans, the least any
-- assignment meeting these quotas can move, and a second rebalance with no change moves 0.
-- Numbers: 16384 * w <= 16384 * W <= 16384 * 65535 * 1000000 < 2^53.
-- Cost: O(16384 + n log n) for n eligible nodes.
-- ---------------------------------------------------------------------------------------------

-- Plans the assignment over `owners` (modified in place). Returns moved, eligible (indexes,
-- ascending), quota (index -> slot count after the plan); or nil when no node is eligible
-- (then `owners` is untouched).
local function plan_rebalance(owners, now_ms)
  local draining = {}
  for _, member in ipairs(redis.call('SMEMBERS', K_DRAINING)) do
    draining[tonumber(member)] = true
  end
  local eligible = {}
  for _, index in ipairs(live_indexes(now_ms)) do
    if not draining[index] then
      eligible[#eligible + 1] = index
    end
  end
  if #eligible == 0 then
    return nil
  end
  local weights = hash_values(K_WEIGHT, eligible)
  local total_weight = 0
  for position = 1, #eligible do
    -- A registered index always has a weight (registry invariant); 1 guards a hand-edited hash.
    weights[position] = tonumber(weights[position]) or 1
    total_weight = total_weight + weights[position]
  end

  local current = count_owned(owners)
  local quota, remainder, candidates = {}, {}, {}
  local assigned = 0
  for position, index in ipairs(eligible) do
    local exact = SLOT_COUNT * weights[position]
    local share = floor(exact / total_weight)
    -- Correct a float rounding of the division (exact and total_weight are exact integers).
    if share * total_weight > exact then
      share = share - 1
    elseif (share + 1) * total_weight <= exact then
      share = share + 1
    end
    quota[index] = share
    remainder[index] = exact - share * total_weight
    assigned = assigned + share
    if remainder[index] > 0 then
      candidates[#candidates + 1] = index
    end
  end
  -- sum(remainders) = leftover * W and each remainder < W, so #candidates >= leftover.
  local leftover = SLOT_COUNT - assigned
  if leftover > 0 then
    -- Rank the candidates by one number each, so the sort runs without a Lua comparator (10x
    -- faster for thousands of nodes): bit 52 = owns more than its floor (keeps a slot),
    -- bits 16..51 = remainder (< W <= 65535 * 1000000 < 2^36), bits 0..15 =
    -- 65535 - index (lower index ranks higher). The sum stays below 2^53, so it is exact.
    local ranks = {}
    for position, index in ipairs(candidates) do
      local keeps = (current[index] or 0) > quota[index] and 4503599627370496 or 0
      ranks[position] = keeps + remainder[index] * 65536 + (65535 - index)
    end
    table.sort(ranks)
    -- The best rank is last.
    for position = #ranks, #ranks - leftover + 1, -1 do
      local index = 65535 - ranks[position] % 65536
      quota[index] = quota[index] + 1
    end
  end

  -- Keep what may stay; collect the rest. quota[owner] is nil for 0 and ineligible owners.
  local kept, moving = {}, {}
  for slot = 1, SLOT_COUNT do
    local owner = owners[slot]
    local owner_quota = quota[owner]
    local owner_kept = kept[owner] or 0
    if owner_quota and owner_kept < owner_quota then
      kept[owner] = owner_kept + 1
    else
      moving[#moving + 1] = slot
    end
  end
  -- sum(quota) = 16384 = sum(kept) + #moving, so the deficits take exactly the moving slots.
  -- A node that gives slots away is at its quota (deficit 0): no slot returns to its owner.
  local next_moving = 1
  for _, index in ipairs(eligible) do
    for _ = 1, quota[index] - (kept[index] or 0) do
      owners[moving[next_moving]] = index
      next_moving = next_moving + 1
    end
  end
  return #moving, eligible, quota
end
local function main()
  key_count(REGISTRY_KEY_COUNT)
  arg_count(0, 0)
  local now_ms = server_now_ms()
  local owners = read_owners()
  local moved, eligible, quota = plan_rebalance(owners, now_ms)
  if not moved then
    fail('NONODE', 'no live node that is not draining')
  end
  local node_ids = hash_values(K_ID, eligible)
  local counts = {}
  for position, index in ipairs(eligible) do
    -- A registered index always has an id (registry invariant); '' guards a hand-edited hash.
    counts[#counts + 1] = node_ids[position] or ''
    counts[#counts + 1] = quota[index]
  end
  -- The only write (SET replaces any value, so it cannot fail).
  if moved > 0 then
    write_owners(owners)
  end
  return { moved, counts }
end

return run(main)
