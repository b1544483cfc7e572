--@script     lock.release
--@summary    Gives back one hold of the lock if `token` owns it (the last hold frees it), and takes the token's waiter
--@+          place away if it has one (how a waiter that gives up leaves). When the lock is free after the call and a
--@+          waiter's place is live, pushes wake-up signals on the wake list (one per live fair waiter, at most
--@+          16; one for a plain lock). Never touches a hold of another owner. A non-empty request_id
--@+          records a call that changed something: replaying it answers the first reply and acts no second time.
--@key        lock        hash    luasched:{ns}:lock:<name> -- the current hold: owner (token), count (holds by
--@+          the owner, reentrant), fence, deadline (server ms). Expires at its deadline; a hold whose deadline
--@+          is not after now is free.
--@key        fence       string  luasched:{ns}:lock-fence:<name> -- the last fencing token granted (decimal).
--@+          Never expires, so fencing tokens keep growing across holds and expiries of the lock key.
--@key        queue       zset    luasched:{ns}:lock-queue:<name> -- fair waiters (token) scored by arrival order.
--@key        places      zset    luasched:{ns}:lock-places:<name> -- waiters (token; fair or not) scored by the
--@+          server ms at which their place lapses unless renewed by another acquire. A release wakes waiters
--@+          while some place is live.
--@key        wake        list    luasched:{ns}:lock-wake:<name> -- wake-up signals pushed when the lock
--@+          frees while someone waits (BLPOP it between attempts); expires 1000 ms after a push.
--@key        request     string  luasched:{ns}:lock-req:<request_id>:<name> -- the recorded reply of a request
--@+          id (unused when request_id is empty); lives 60000 ms.
--@arg        token       string:1..256  The owner token given to lock.acquire.
--@arg        request_id  string:0..64  Idempotency key, unique per attempt ("" for none).
--@reply      array{status:string, count:int, now_ms:int}  status "released": count = holds the owner still has
--@+          (0: the lock is free). "not_owner": another owner holds the lock (count 0). "expired": nobody holds
--@+          it (the caller's hold, if it had one, lapsed; count 0). now_ms: the server's clock at the call.
--@error      ARG  Not 6 keys or 2 arguments, or an argument out of its range.
--@error      CORRUPT  A key of the lock holds another type or shape than the layout; nothing changed.
--@complexity O(log n) with n waiters
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
local SCRIPT_NAME = 'lock.release'
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
    local layout, culprit = { 'hash', 'string', 'zset', 'zset', 'list', 'string' }, 'a key'
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
-- lock_state (lua/include/lock_state.lua.j2): the KEYS of a lock and how its hold is read.
--
-- Every lock.acquire/release/extend takes the same 6 KEYS, in this order (all under the
-- namespace's hash tag, so one cluster slot; the lock name is arbitrary bytes and only ever the
-- tail of a key name, after a fixed kind, so two names never share a key):
--   1 lock:<name>         HASH   owner, count, fence, deadline
--   2 lock-fence:<name>   STRING last fencing token granted (never expires)
--   3 lock-queue:<name>   ZSET   fair waiters by arrival order
--   4 lock-places:<name>  ZSET   waiters (fair or not) by the server ms their place lapses
--   5 lock-wake:<name>    LIST   wake-up signals
--   6 lock-req:<request_id>:<name>  STRING recorded reply of a request id
--
-- Invariants:
--   * The lock hash is absent, or holds all of owner, count (>= 1), fence (>= 1), deadline. The
--     hold is live while deadline > now; a lapsed hold is free even before the key expires.
--   * fence only grows: each grant writes the fence key + 1 and copies it into the hold.
--   * Every member of queue (fair waiters) is in places; places also holds the waiters of a
--     non-fair lock, so a release knows whether anyone waits (a live place) and wakes them.
--     A place is live while its deadline > now; for the fair grant order the caller's own place
--     counts as live (it is renewing it right now).
-- ---------------------------------------------------------------------------------------------
local K_LOCK, K_FENCE, K_QUEUE, K_PLACES, K_WAKE, K_REQUEST =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local LOCK_KEY_COUNT = 6
local QUEUE_SCAN = 64

-- The live hold as a table {owner, count, fence, deadline}, or nil when the lock is
-- free (no key, or its deadline passed). Second result: whether the key exists at all.
local function read_hold(now_ms)
  local fields = read('HMGET', K_LOCK, 'owner', 'count', 'fence', 'deadline')
  local owner = fields[1]
  if not owner then
    if fields[2] or fields[3] or fields[4] then
      fail('CORRUPT', 'the lock hash has no owner')
    end
    return nil, false
  end
  local hold = {
    owner = owner,
    count = stored_int(fields[2], 'count'),
    fence = stored_int(fields[3], 'fence'),
    deadline = stored_int(fields[4], 'deadline'),
  }
  if not hold.count or not hold.fence or not hold.deadline or hold.count < 1 then
    fail('CORRUPT', 'the lock hash lacks count, fence or deadline')
  end
  if hold.deadline <= now_ms then
    return nil, true
  end
  return hold, true
end

local function main()
  key_count(LOCK_KEY_COUNT)
  arg_count(2, 2)
  local token = arg_string(1, 'token', 1, 256)
  local request_id = arg_string(2, 'request_id', 0, 64)
  local now_ms = server_now_ms()
  local recorded = recorded_reply(K_REQUEST, request_id)
  if recorded then
    return recorded
  end
  local hold = read_hold(now_ms)
  local queued = read('ZSCORE', K_QUEUE, token)
  local place = read('ZSCORE', K_PLACES, token)
  local fair_waiters = read('ZCARD', K_QUEUE)
  local waiting = read('ZCOUNT', K_PLACES, '(' .. decimal(now_ms), '+inf')
  if place and tonumber(place) > now_ms then
    waiting = waiting - 1 -- the caller leaves
  end
  local status, left = 'expired', 0
  if hold and hold.owner == token then
    status, left = 'released', hold.count - 1
  elseif hold then
    status = 'not_owner'
  end
  local changed = status == 'released' or queued ~= false or place ~= false
  local free_after = hold == nil or (status == 'released' and left == 0)
  -- Wake waiters when the lock is (still) free after a change and some waiter's place is live:
  -- one signal for a plain lock (one waiter can take it), one per live place for a fair one (the
  -- head may be any of them), at most WAKE_MAX.
  local wake = changed and free_after and waiting > 0
  if wake then
    check_type(K_WAKE, 'list')
  end
  -- Writes from here on (none can fail: every key's type was checked above).
  if status == 'released' then
    if left > 0 then
      redis.call('HSET', K_LOCK, 'count', decimal(left))
    else
      redis.call('DEL', K_LOCK)
    end
  end
  if queued then
    redis.call('ZREM', K_QUEUE, token)
  end
  if place then
    redis.call('ZREM', K_PLACES, token)
  end
  if wake then
    push_wake(K_WAKE, fair_waiters > 0 and waiting or 1)
  end
  local reply = { status, left, now_ms }
  if changed then
    record_reply(K_REQUEST, request_id, reply)
  end
  return reply
end

return run(main)
