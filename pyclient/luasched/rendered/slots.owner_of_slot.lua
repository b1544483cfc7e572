--@script     slots.owner_of_slot
--@summary    The live node that owns a hash slot, for clients that compute slots themselves (CRC-16/XMODEM
--@+          of the key or its hash tag, modulo 16384). Same semantics as slots.owner.
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
--@arg        slot  int:0..16383  The slot.
--@reply      array{slot:int:0..16383, found:int:0..1, node_id:string}  found = 0 (and node_id "") when the
--@+          slot has no live owner.
--@error      ARG  Not 14 keys or 1 argument, or a slot out of 0..16383.
--@error      NONODE  The slot has no live owner and no node at all is live.
--@complexity O(1): GETRANGE, ZSCORE, HGET; independent of the node count
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
local SCRIPT_NAME = 'slots.owner_of_slot'
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
local function run(main)
  local ok, result = pcall(main)
  if ok then
    return result
  end
  if type(result) == 'table' and result.luasched_error then
    return redis.error_reply(result.luasched_error)
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

-- Whether any node is live now. O(log n).
local function any_live(now_ms)
  return redis.call('ZCOUNT', K_DEADLINE, '(' .. decimal(now_ms), '+inf') > 0
end

-- ---------------------------------------------------------------------------------------------
-- lookup (lua/include/lookup.lua.j2): the live owner of a slot. Needs include/registry.lua.j2.
--
-- Semantics shared by slots.owner, slots.owners and slots.owner_of_slot: a lookup never answers
-- a node that is not live. A slot that has no owner in the table, or whose owner's deadline has
-- lapsed (dead, not yet swept), has no live owner: its entry is {slot, 0, ""}. A lookup does
-- not fall through to another node (that node would change again at the next rebalance, and
-- two lookups with no write between them could disagree as time passes); the caller retries
-- after nodes.sweep or slots.rebalance. When no node at all is live, the call fails with
-- NONODE instead, since no rebalance could help. O(1) per slot (GETRANGE, ZSCORE, HGET).
-- ---------------------------------------------------------------------------------------------

-- The node id of the live owner of `slot` (0-based) and its index (a number), or nil.
local function live_owner(slot, now_ms)
  local pair = redis.call('GETRANGE', K_SLOTS, slot * 2, slot * 2 + 1)
  if #pair < 2 then
    return nil
  end
  local index = string.byte(pair, 1) * 256 + string.byte(pair, 2)
  if index == 0 then
    return nil
  end
  local deadline = redis.call('ZSCORE', K_DEADLINE, index)
  -- ZSCORE answers "inf" for a node without deadline; tonumber reads it as infinity.
  if not deadline or tonumber(deadline) <= now_ms then
    return nil
  end
  local node_id = redis.call('HGET', K_ID, index)
  if not node_id then
    return nil
  end
  return node_id, index
end

-- The reply entry for `slot`: {slot, 1, node id} or {slot, 0, ""}.
local function owner_entry(slot, node_id)
  if node_id then
    return { slot, 1, node_id }
  end
  return { slot, 0, '' }
end

-- Fails with NONODE when some slot lacked a live owner and no node is live at all.
local function require_some_live(now_ms)
  if not any_live(now_ms) then
    fail('NONODE', 'no live node is registered')
  end
end
local function main()
  key_count(REGISTRY_KEY_COUNT)
  arg_count(1, 1)
  local slot = arg_int(1, 'slot', 0, SLOT_COUNT - 1)
  local now_ms = server_now_ms()
  local node_id = live_owner(slot, now_ms)
  if not node_id then
    require_some_live(now_ms)
  end
  return owner_entry(slot, node_id)
end

return run(main)
