--@script     lock.semaphore_extend
--@summary    Moves the lease of `token` to the server's now + ttl_ms (longer or shorter), only while its lease is
--@+          live: a lapsed lease is never revived (its permit may have gone to someone else). Idempotent.
--@key        holders     zset    luasched:{ns}:sem:<name> -- permit holders (token) scored by their lease
--@+          deadline (server ms). A lease whose deadline is not after now is free again.
--@key        wake        list    luasched:{ns}:sem-wake:<name> -- wake-up signals pushed by a release (BLPOP it
--@+          between attempts); expires 1000 ms after a push.
--@key        request     string  luasched:{ns}:sem-req:<request_id>:<name> -- the recorded reply of a request
--@+          id (unused when request_id is empty); lives 60000 ms.
--@arg        token   string:1..256  The holder token given to lock.semaphore_acquire.
--@arg        ttl_ms  int:1..31536000000  The new deadline is the server's now + ttl_ms.
--@reply      array{status:string, deadline_ms:int, now_ms:int}  status "extended": deadline_ms = the new lease
--@+          deadline (server ms). "expired": the caller holds no live permit (deadline_ms 0).
--@error      ARG  Not 3 keys or 2 arguments, or an argument out of its range.
--@error      CORRUPT  The holders key holds another type than a zset; nothing changed.
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
local SCRIPT_NAME = 'lock.semaphore_extend'
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

-- Writes a lease and keeps the key alive at least until it lapses (key_ttl_ms: PTTL read before
-- the first write; -1 = a key without expiry, left so).
local function write_lease(token, deadline_ms, now_ms, key_ttl_ms)
  redis.call('ZADD', K_HOLDERS, decimal(deadline_ms), token)
  if key_ttl_ms ~= -1 and key_ttl_ms < deadline_ms - now_ms then
    redis.call('PEXPIRE', K_HOLDERS, deadline_ms - now_ms)
  end
end
local function main()
  key_count(SEMAPHORE_KEY_COUNT)
  arg_count(2, 2)
  local token = arg_string(1, 'token', 1, 256)
  local ttl_ms = arg_int(2, 'ttl_ms', 1, 31536000000)
  local now_ms = server_now_ms()
  local lease = lease_of(token)
  if lease == nil or lease <= now_ms then
    return { 'expired', 0, now_ms }
  end
  local key_ttl_ms = read('PTTL', K_HOLDERS)
  local deadline_ms = now_ms + ttl_ms
  write_lease(token, deadline_ms, now_ms, key_ttl_ms)
  return { 'extended', deadline_ms, now_ms }
end

return run(main)
