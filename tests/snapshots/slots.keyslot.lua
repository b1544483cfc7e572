--@script     slots.keyslot
--@summary    The Redis Cluster hash slot (0..16383) of each key given in ARGV, as CLUSTER KEYSLOT computes it.
--@+          CRC-16/XMODEM of the key, or of its hash tag (the bytes between the first "{" and the first
--@+          "}" after it, when there is at least one), modulo 16384. Reads and writes nothing.
--@arg        key[1..1000] string:0..4096  A key to hash; any bytes.
--@reply      array<int:0..16383>  One slot per key, in ARGV order.
--@error      ARG  No key, more than 1000 keys, or a key longer than 4096 bytes.
--@complexity O(total length of the hashed parts of the keys)
--@since      6.2
--@flags      no-writes allow-stale
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
local SCRIPT_NAME = 'slots.keyslot'
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
local function main()
  key_count(0)
  local count = arg_count(1, 1000)
  -- Check every key before hashing any, so a bad key costs nothing.
  for index = 1, count do
    arg_string(index, 'key #' .. index, 0, 4096)
  end
  local slots = {}
  for index = 1, count do
    slots[index] = key_slot(ARGV[index])
  end
  return slots
end

return run(main)
