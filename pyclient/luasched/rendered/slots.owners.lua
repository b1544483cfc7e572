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
-- byte between them. slot = crc % 16384. The 256-entry table is generated by the renderer as one
-- 512-byte string constant (entry i, 0-based, is bytes 2i+1 and 2i+2, big-endian): a string is
-- created once when the script is compiled, whereas a table constructor runs on every call
-- (~2 us for 256 entries).
-- ---------------------------------------------------------------------------------------------
local CRC16_TABLE =
'\0\0\16\33\32\66\48\99\64\132\80\165\96\198\112\231\129\8\145\41\161\74\177\107\193\140\209\173\225\206\241\239\18\49\2\16\50\115\34\82\82\181\66\148\114\247\98\214\147\57\131\24\179\123\163\90\211\189\195\156\243\255\227\222\36\98\52\67\4\32\20\1\100\230\116\199\68\164\84\133\165\106\181\75\133\40\149\9\229\238\245\207\197\172\213\141\54\83\38\114\22\17\6\48\118\215\102\246\86\149\70\180\183\91\167\122\151\25\135\56\247\223\231\254\215\157\199\188\72\196\88\229\104\134\120\167\8\64\24\97\40\2\56\35\201\204\217\237\233\142\249\175\137\72\153\105\169\10\185\43\90\245\74\212\122\183\106\150\26\113\10\80\58\51\42\18\219\253\203\220\251\191\235\158\155\121\139\88\187\59\171\26\108\166\124\135\76\228\92\197\44\34\60\3\12\96\28\65\237\174\253\143\205\236\221\205\173\42\189\11\141\104\157\73\126\151\110\182\94\213\78\244\62\19\46\50\30\81\14\112\255\159\239\190\223\221\207\252\191\27\175\58\159\89\143\120\145\136\129\169\177\202\161\235\209\12\193\45\241\78\225\111\16\128\0\161\48\194\32\227\80\4\64\37\112\70\96\103\131\185\147\152\163\251\179\218\195\61\211\28\227\127\243\94\2\177\18\144\34\243\50\210\66\53\82\20\98\119\114\86\181\234\165\203\149\168\133\137\245\110\229\79\213\44\197\13\52\226\36\195\20\160\4\129\116\102\100\71\84\36\68\5\167\219\183\250\135\153\151\184\231\95\247\126\199\29\215\60\38\211\54\242\6\145\22\176\102\87\118\118\70\21\86\52\217\76\201\109\249\14\233\47\153\200\137\233\185\138\169\171\88\68\72\101\120\6\104\39\24\192\8\225\56\130\40\163\203\125\219\92\235\63\251\30\139\249\155\216\171\187\187\154\74\117\90\84\106\55\122\22\10\241\26\208\42\179\58\146\253\46\237\15\221\108\205\77\189\170\173\139\157\232\141\201\124\38\108\7\92\100\76\69\60\162\44\131\28\224\12\193\239\31\255\62\207\93\223\124\175\155\191\186\143\217\159\248\110\23\126\54\78\85\94\116\46\147\62\178\14\209\30\240'

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
    -- Entry index = (high byte of crc) xor (next byte of the key).
    local entry = bxor(rshift(crc, 8), byte(key, position)) * 2
    local high, low = byte(CRC16_TABLE, entry + 1, entry + 2)
    crc = bxor(band(lshift(crc, 8), 0xffff), high * 256 + low)
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
