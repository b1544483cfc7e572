--@script     slots.owners
--@summary    slots.owner for up to 1000 keys in one call, with the same semantics (one
--@+          clock reading for the whole batch, so every answer is of the same instant).
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
--@arg        key[1..1000]  string:0..4096  A key to look up; any bytes.
--@reply      array<array{slot:int:0..16383, found:int:0..1, node_id:string}>  One entry per key, in ARGV
--@+          order; found = 0 (and node_id "") when the slot has no live owner.
--@error      ARG  Not 14 keys, no key, more than 1000 keys, or a key longer than
--@+          4096 bytes.
--@error      NONODE  Some slot has no live owner and no node at all is live.
--@complexity O(total length of the keys) + O(1) per key; independent of the node count
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
local SCRIPT_NAME = 'slots.owners'
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

-- ARGV[index] as a finite decimal number in [low, high] ("1", "-0.5", "2.5e3"; no hex/inf/nan).
local function arg_number(index, name, low, high)
  local raw = ARGV[index]
  local shaped = raw ~= nil and #raw <= 32
    and (string.find(raw, '^%-?%d+%.?%d*[eE][%+%-]?%d+$') or string.find(raw, '^%-?%d+%.?%d*$')
      or string.find(raw, '^%-?%.%d+$'))
  local value = shaped and tonumber(raw)
  -- value ~= value is NaN; the bounds reject +-inf (an exponent like 1e999 overflows to inf).
  if not value or value ~= value or value < low or value > high then
    fail('ARG', name .. ' must be a number between ' .. decimal(low) .. ' and ' .. decimal(high)
      .. ', got ' .. show(raw))
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

-- ARGV[index] as one of the strings in `choices` (a list).
local function arg_enum(index, name, choices)
  local raw = ARGV[index]
  for _, choice in ipairs(choices) do
    if raw == choice then
      return raw
    end
  end
  fail('ARG', name .. ' must be one of ' .. table.concat(choices, '|') .. ', got ' .. show(raw))
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
-- crc16 (lua/include/crc16.lua.j2): the Redis Cluster key slot of a key.
--
-- CRC-16/XMODEM (polynomial 0x1021, initial value 0) of the key, or of its hash tag when the key
-- has one: the bytes between the first "{" and the first "}" after it, if there is at least one
-- byte between them. slot = crc % 16384. The 256-entry table below is generated by the renderer
-- (a literal costs nothing per call; building it inside the script would cost ~230 us per call).
-- ---------------------------------------------------------------------------------------------
local CRC16_TABLE = {
  0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7,
  0x8108, 0x9129, 0xa14a, 0xb16b, 0xc18c, 0xd1ad, 0xe1ce, 0xf1ef,
  0x1231, 0x0210, 0x3273, 0x2252, 0x52b5, 0x4294, 0x72f7, 0x62d6,
  0x9339, 0x8318, 0xb37b, 0xa35a, 0xd3bd, 0xc39c, 0xf3ff, 0xe3de,
  0x2462, 0x3443, 0x0420, 0x1401, 0x64e6, 0x74c7, 0x44a4, 0x5485,
  0xa56a, 0xb54b, 0x8528, 0x9509, 0xe5ee, 0xf5cf, 0xc5ac, 0xd58d,
  0x3653, 0x2672, 0x1611, 0x0630, 0x76d7, 0x66f6, 0x5695, 0x46b4,
  0xb75b, 0xa77a, 0x9719, 0x8738, 0xf7df, 0xe7fe, 0xd79d, 0xc7bc,
  0x48c4, 0x58e5, 0x6886, 0x78a7, 0x0840, 0x1861, 0x2802, 0x3823,
  0xc9cc, 0xd9ed, 0xe98e, 0xf9af, 0x8948, 0x9969, 0xa90a, 0xb92b,
  0x5af5, 0x4ad4, 0x7ab7, 0x6a96, 0x1a71, 0x0a50, 0x3a33, 0x2a12,
  0xdbfd, 0xcbdc, 0xfbbf, 0xeb9e, 0x9b79, 0x8b58, 0xbb3b, 0xab1a,
  0x6ca6, 0x7c87, 0x4ce4, 0x5cc5, 0x2c22, 0x3c03, 0x0c60, 0x1c41,
  0xedae, 0xfd8f, 0xcdec, 0xddcd, 0xad2a, 0xbd0b, 0x8d68, 0x9d49,
  0x7e97, 0x6eb6, 0x5ed5, 0x4ef4, 0x3e13, 0x2e32, 0x1e51, 0x0e70,
  0xff9f, 0xefbe, 0xdfdd, 0xcffc, 0xbf1b, 0xaf3a, 0x9f59, 0x8f78,
  0x9188, 0x81a9, 0xb1ca, 0xa1eb, 0xd10c, 0xc12d, 0xf14e, 0xe16f,
  0x1080, 0x00a1, 0x30c2, 0x20e3, 0x5004, 0x4025, 0x7046, 0x6067,
  0x83b9, 0x9398, 0xa3fb, 0xb3da, 0xc33d, 0xd31c, 0xe37f, 0xf35e,
  0x02b1, 0x1290, 0x22f3, 0x32d2, 0x4235, 0x5214, 0x6277, 0x7256,
  0xb5ea, 0xa5cb, 0x95a8, 0x8589, 0xf56e, 0xe54f, 0xd52c, 0xc50d,
  0x34e2, 0x24c3, 0x14a0, 0x0481, 0x7466, 0x6447, 0x5424, 0x4405,
  0xa7db, 0xb7fa, 0x8799, 0x97b8, 0xe75f, 0xf77e, 0xc71d, 0xd73c,
  0x26d3, 0x36f2, 0x0691, 0x16b0, 0x6657, 0x7676, 0x4615, 0x5634,
  0xd94c, 0xc96d, 0xf90e, 0xe92f, 0x99c8, 0x89e9, 0xb98a, 0xa9ab,
  0x5844, 0x4865, 0x7806, 0x6827, 0x18c0, 0x08e1, 0x3882, 0x28a3,
  0xcb7d, 0xdb5c, 0xeb3f, 0xfb1e, 0x8bf9, 0x9bd8, 0xabbb, 0xbb9a,
  0x4a75, 0x5a54, 0x6a37, 0x7a16, 0x0af1, 0x1ad0, 0x2ab3, 0x3a92,
  0xfd2e, 0xed0f, 0xdd6c, 0xcd4d, 0xbdaa, 0xad8b, 0x9de8, 0x8dc9,
  0x7c26, 0x6c07, 0x5c64, 0x4c45, 0x3ca2, 0x2c83, 0x1ce0, 0x0cc1,
  0xef1f, 0xff3e, 0xcf5d, 0xdf7c, 0xaf9b, 0xbfba, 0x8fd9, 0x9ff8,
  0x6e17, 0x7e36, 0x4e55, 0x5e74, 0x2e93, 0x3eb2, 0x0ed1, 0x1ef0,
}

local function key_slot(key)
  local open = string.find(key, '{', 1, true)
  if open then
    local close = string.find(key, '}', open + 1, true)
    if close and close > open + 1 then
      key = string.sub(key, open + 1, close - 1)
    end
  end
  local bxor, band, lshift, rshift, byte = bit.bxor, bit.band, bit.lshift, bit.rshift, string.byte
  local crc = 0
  for position = 1, #key do
    -- Index = (high byte of crc) xor (next byte); the table is 1-based.
    crc = band(bxor(lshift(crc, 8), CRC16_TABLE[bxor(rshift(crc, 8), byte(key, position)) + 1]), 0xffff)
  end
  return band(crc, 0x3fff)
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

-- An integer (below 2^53) as a plain decimal string, for arguments and concatenation
-- (tostring would switch to exponent notation above 14 digits).
local function decimal(value)
  return string.format('%.0f', value)
end

-- The server's clock in ms. Called once, at the top of a script (TIME is frozen inside a
-- script on 7.2+ anyway; on 7.0 it advances, so a second call could disagree with the first).
local function server_now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + floor(tonumber(time[2]) / 1000)
end

-- The index (a number) of a registered node id, or nil.
local function index_of(node_id)
  local index = redis.call('HGET', K_INDEX, node_id)
  return index and tonumber(index) or nil
end

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

-- Whether any node is live now. O(log n).
local function any_live(now_ms)
  return redis.call('ZCOUNT', K_DEADLINE, '(' .. decimal(now_ms), '+inf') > 0
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

-- The node id of the live owner of `slot` (0-based), or nil.
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
  return redis.call('HGET', K_ID, index) or nil
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
  local count = arg_count(1, 1000)
  -- Check every key before looking any up.
  for position = 1, count do
    arg_string(position, 'key #' .. position, 0, 4096)
  end
  local now_ms = server_now_ms()
  local entries = {}
  local all_found = true
  for position = 1, count do
    local slot = key_slot(ARGV[position])
    local node_id = live_owner(slot, now_ms)
    all_found = all_found and node_id ~= nil
    entries[position] = owner_entry(slot, node_id)
  end
  if not all_found then
    require_some_live(now_ms)
  end
  return entries
end

return run(main)
