--@script     lock.semaphore_release
--@summary    Gives back the permit of `token`: removes its lease and, if it was live, pushes one wake-up signal on
--@+          the wake list. A lapsed lease is removed too (its permit was already free). A non-empty request_id
--@+          records a call that removed a lease: replaying it answers the first reply and acts no second time.
--@key        holders     zset    luasched:{ns}:sem:<name> -- permit holders (token) scored by their lease
--@+          deadline (server ms). A lease whose deadline is not after now is free again.
--@key        wake        list    luasched:{ns}:sem-wake:<name> -- wake-up signals pushed by a release (BLPOP it
--@+          between attempts); expires 1000 ms after a push.
--@key        request     string  luasched:{ns}:sem-req:<request_id>:<name> -- the recorded reply of a request
--@+          id (unused when request_id is empty); lives 60000 ms.
--@arg        token       string:1..256  The holder token given to lock.semaphore_acquire.
--@arg        request_id  string:0..64  Idempotency key, unique per attempt ("" for none).
--@reply      array{status:string, holders:int, now_ms:int}  status "released": the caller's live permit was given
--@+          back. "expired": the caller held no live permit (its lease lapsed, or it never had one). holders = live
--@+          leases after the call; now_ms: the server's clock at the call.
--@error      ARG  Not 3 keys or 2 arguments, or an argument out of its range.
--@error      CORRUPT  A key of the semaphore holds another type or shape than the layout; nothing changed.
--@complexity O(log n) with n entries
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
local SCRIPT_NAME = 'lock.semaphore_release'
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
    local layout, culprit = { 'zset', 'list', 'string' }, 'a key'
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
-- lock (lua/include/lock.lua.j2): helpers shared by the lock.* scripts (locks and semaphores).
--
-- Invariants the scripts rely on:
--   * Every read goes through read(), which turns a wrong-type error into CORRUPT. Scripts read
--     everything they need (and check the type of every key they will write) before their
--     first write, and the writes that follow cannot fail: a refused call changes no key.
--   * Time is the server's clock, read once per call (server_now_ms); clients pass relative
--     durations only. A deadline is held while deadline > now.
--   * A recorded reply (request id) is a line of space-separated fields: a status word, then
--     integers in plain decimal. It is written only by a call that changed something, so a replay
--     of such a call answers the first reply and acts no second time; a call that changed nothing
--     is not recorded (running it again is the same as replaying it).
-- ---------------------------------------------------------------------------------------------
local floor = math.floor
local REQUEST_TTL_MS = 60000
local WAKE_MAX = 16
local WAKE_TTL_MS = 1000

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
-- Fails with CORRUPT unless `key` is absent or of `expected` type.
local function check_type(key, expected)
  local found = redis.call('TYPE', key).ok
  if found ~= 'none' and found ~= expected then
    fail('CORRUPT', 'key ' .. show(key) .. ' holds a ' .. found .. ', expected a ' .. expected)
  end
end

-- A stored integer field: nil stays nil, anything but a plain decimal is CORRUPT.
local function stored_int(raw, what)
  if raw == nil or raw == false then
    return nil
  end
  if #raw > 17 or not string.find(raw, '^%-?%d+$') then
    fail('CORRUPT', what .. ' holds ' .. show(raw) .. ', expected an integer')
  end
  return tonumber(raw)
end

-- The reply recorded for `request_id` in `key`, or nil (none recorded, or no request id).
local function recorded_reply(key, request_id)
  if request_id == '' then
    return nil
  end
  local raw = read('GET', key)
  if not raw then
    return nil
  end
  local reply = {}
  for field in string.gmatch(raw, '%S+') do
    reply[#reply + 1] = #reply == 0 and field or stored_int(field, 'the request record')
  end
  if #reply == 0 then
    fail('CORRUPT', 'the request record is empty')
  end
  return reply
end

-- Records `reply` for `request_id` (a write: call it last). SET replaces any type: cannot fail.
local function record_reply(key, request_id, reply)
  if request_id == '' then
    return
  end
  local fields = { reply[1] }
  for position = 2, #reply do
    fields[position] = decimal(reply[position])
  end
  redis.call('SET', key, table.concat(fields, ' '), 'PX', REQUEST_TTL_MS)
end

-- Pushes `count` (1..WAKE_MAX) wake-up signals on the list `key` and keeps it short-lived.
-- The caller checked the key's type (check_type(key, 'list')) before its first write.
local function push_wake(key, count)
  local signals = {}
  for position = 1, math.min(math.max(count, 1), WAKE_MAX) do
    signals[position] = '1'
  end
  redis.call('LPUSH', key, unpack(signals))
  redis.call('LTRIM', key, 0, WAKE_MAX - 1)
  redis.call('PEXPIRE', key, WAKE_TTL_MS)
end
-- ---------------------------------------------------------------------------------------------
-- semaphore_state (lua/include/semaphore_state.lua.j2): the KEYS of a counting semaphore.
--
-- Every lock.semaphore_* script takes the same 3 KEYS, in this order (one hash tag):
--   1 sem:<name>                    ZSET   holder token -> lease deadline (server ms)
--   2 sem-wake:<name>               LIST   wake-up signals
--   3 sem-req:<request_id>:<name>   STRING recorded reply of a request id
--
-- Invariants:
--   * A permit is held while its lease deadline > now; a lapsed lease is free at once (it is
--     not counted) and its entry is reclaimed by later acquires, at most RECLAIM_LIMIT per call.
--   * The zset key expires no earlier than its last lease: it vanishes once every lease lapsed.
--   * The permit count is the caller's argument, not stored: every caller of one semaphore name
--     must pass the same count.
-- ---------------------------------------------------------------------------------------------
local K_HOLDERS, K_WAKE, K_REQUEST = KEYS[1], KEYS[2], KEYS[3]
local SEMAPHORE_KEY_COUNT = 3
local RECLAIM_LIMIT = 64

-- The lease deadline of `token` (a number), or nil when it holds no entry.
local function lease_of(token)
  local score = read('ZSCORE', K_HOLDERS, token)
  return score and tonumber(score) or nil
end

-- How many leases are live at now_ms. O(log n).
local function live_count(now_ms)
  return read('ZCOUNT', K_HOLDERS, '(' .. decimal(now_ms), '+inf')
end

local function main()
  key_count(SEMAPHORE_KEY_COUNT)
  arg_count(2, 2)
  local token = arg_string(1, 'token', 1, 256)
  local request_id = arg_string(2, 'request_id', 0, 64)
  local now_ms = server_now_ms()
  local recorded = recorded_reply(K_REQUEST, request_id)
  if recorded then
    return recorded
  end
  local lease = lease_of(token)
  local live = live_count(now_ms)
  local released = lease ~= nil and lease > now_ms
  if released then
    live = live - 1
    check_type(K_WAKE, 'list')
  end
  -- Writes from here on (K_HOLDERS was read as a zset, K_WAKE checked when it is written).
  if lease then
    redis.call('ZREM', K_HOLDERS, token)
  end
  if released then
    push_wake(K_WAKE, 1)
  end
  local reply = { released and 'released' or 'expired', live, now_ms }
  if lease then
    record_reply(K_REQUEST, request_id, reply)
  end
  return reply
end

return run(main)
