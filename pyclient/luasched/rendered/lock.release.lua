--@script     lock.release
--@summary    Gives back one hold of the lock if `token` owns it (the last hold frees it), and takes the token's waiter
--@+          place away if it has one (how a waiter that gives up leaves). When the lock is free after the call and a
--@+          waiter's place is live, pushes one wake-up signal: on the wake list (plain lock), or on the own list of
--@+          the fair queue's head (its oldest live place). Never touches a hold of another owner. A release by the
--@+          last grantee of a lock it already released answers "released" again (a replay acts no second time). A
--@+          non-empty request_id records a call that changed something: replaying it answers the first reply and
--@+          acts no second time (what reentrant releases need). The common call, the owner's only hold, no waiter
--@+          refused during it, request_id "", takes a lean path (TIME, GET, SET).
--@key        lock        string  luasched:{ns}:lock:<name> -- the lock's state, "<fence> <count> <deadline>
--@+          <granted> <waited> <owner>": the last fencing token granted, the owner's holds (0: released), the
--@+          deadline and grant time (server ms), 1 if a waiter was refused during the hold, the last grantee's
--@+          token. Never expires (it carries the fence, which keeps growing across holds); the hold is live while
--@+          count >= 1 and deadline > now.
--@key        queue       zset    luasched:{ns}:lock-queue:<name> -- fair waiters (token) scored by arrival order.
--@key        places      zset    luasched:{ns}:lock-places:<name> -- waiters (token; fair or not) scored by the
--@+          server ms at which their place lapses unless renewed by another acquire. A release wakes waiters
--@+          while some place is live.
--@key        wake        list    luasched:{ns}:lock-wake:<name> -- wake-up signals of a non-fair lock, pushed
--@+          when it frees while someone waits (BLPOP it between attempts); expires 1000 ms after
--@+          a push. A fair waiter blocks on its own list luasched:{ns}:lock-waiter:<token>:<name> instead (built
--@+          from the lock key), pushed when it is at the head of the queue and the lock frees.
--@key        request     string  luasched:{ns}:lock-req:<request_id>:<name> -- the recorded reply of a request
--@+          id (unused when request_id is empty); lives 60000 ms.
--@arg        token       string:1..256  The owner token given to lock.acquire.
--@arg        request_id  string:0..64  Idempotency key, unique per attempt ("" for none).
--@reply      array{status:string, count:int, now_ms:int}  status "released": count = holds the owner still has
--@+          (0: the lock is free). "not_owner": another owner holds the lock (count 0). "expired": nobody holds
--@+          it (the caller's hold, if it had one, lapsed; count 0). now_ms: the server's clock at the call.
--@error      ARG  Not 5 keys or 2 arguments, or an argument out of its range.
--@error      CORRUPT  A key of the lock holds another type or shape than the layout; nothing changed.
--@complexity O(log n) with n waiters
--@since      6.2

-- The lean path: the owner's only hold, no waiter refused during it, no request id (what
-- handle.release() of a plain lock sends). Like lock.acquire's, it runs before the helpers below
-- are defined, accepts a subset of what main() accepts, and leaves everything else to main()
-- (with FAST_NOW_MS: TIME is read once). Its one write (SET of the lock key, read as a string
-- just before) cannot fail on a key's type. The state keeps fence, deadline, grant and owner, so
-- a replayed acquire still finds its grant and a replayed release its release.
local FAST_NOW_MS = nil
if #KEYS == 5 and #ARGV == 2 and ARGV[2] == '' and #ARGV[1] >= 1 and #ARGV[1] <= 256 then
  local token = ARGV[1]
  local time = redis.call('TIME')
  local now_ms = time[1] * 1000 + math.floor(time[2] / 1000) -- decimals: arithmetic converts
  FAST_NOW_MS = now_ms
  local raw = redis.pcall('GET', KEYS[1])
  if type(raw) == 'string' then
    -- The state of a single hold (count 1) that no waiter asked for (waited 0).
    local fence, deadline, granted, owner = string.match(raw, '^(%d+) 1 (%d+) (%d+) 0 (.+)$')
    if owner == token and #deadline <= 16 and deadline + 0 > now_ms then
      redis.call('SET', KEYS[1], fence .. ' 0 ' .. deadline .. ' ' .. granted .. ' 0 ' .. token)
      return { 'released', 0, now_ms }
    end
  end
end

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
    local layout, culprit = { 'string', 'zset', 'zset', 'list', 'string' }, 'a key'
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
-- lock_state (lua/include/lock_state.lua.j2): the KEYS of a lock and how its state is read and
-- written.
--
-- Every lock.acquire/release/extend takes the same 5 KEYS, in this order (all under the
-- namespace's hash tag, so one cluster slot; the lock name is arbitrary bytes and only ever the
-- tail of a key name, after a fixed kind, so two names never share a key):
--   1 lock:<name>         STRING the lock's state (below); never expires
--   2 lock-queue:<name>   ZSET   fair waiters by arrival order
--   3 lock-places:<name>  ZSET   waiters (fair or not) by the server ms their place lapses
--   4 lock-wake:<name>    LIST   wake-up signals of a non-fair lock
--   5 lock-req:<request_id>:<name>  STRING recorded reply of a request id
-- A fair waiter's own wake list, lock-waiter:<token>:<name>, is built from KEYS[1] (same hash
-- tag): a release pushes on the head of the queue's list only.
--
-- The state is one string: "<fence> <count> <deadline> <granted> <waited> <owner>" (five plain
-- decimals, then the owner token, any bytes). fence: the last fencing token granted (>= 1);
-- count: holds of the owner (0: released); deadline and granted: server ms of the last grant
-- (deadline moved by extend / a reentrant acquire); waited: 1 if a waiter was refused during
-- this hold (the release then looks at the waiters, else it skips them); owner: the last grantee.
--
-- Invariants:
--   * The key never expires: it carries the fence, which only grows (each grant writes
--     fence + 1), across releases and lapses. The hold is live while count >= 1 and
--     deadline > now; a released or lapsed hold is free.
--   * owner is the token of the last grant: for a non-reentrant acquire the token is its own
--     idempotency key (a replay finds it here and answers that grant; it never grants twice).
--   * Every member of queue (fair waiters) is in places; places also holds the waiters of a
--     non-fair lock, so a release knows whether anyone waits (a live place) and wakes them.
--     A place is live while its deadline > now; for the fair grant order the caller's own place
--     counts as live (it is renewing it right now).
-- ---------------------------------------------------------------------------------------------
local K_LOCK, K_QUEUE, K_PLACES, K_WAKE, K_REQUEST = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local LOCK_KEY_COUNT = 5
local QUEUE_SCAN = 64

-- The lock's state as a table {fence, count, deadline, granted, waited, owner}, or nil when the
-- key does not exist. CORRUPT if it holds another type or shape.
local function read_state()
  local raw = read('GET', K_LOCK)
  if not raw then
    return nil
  end
  local fence, count, deadline, granted, waited, owner = string.match(raw, '^(%d+) (%d+) (%d+) (%d+) ([01]) (.+)$')
  if not fence or #fence > 16 or #count > 16 or #deadline > 16 or #granted > 16 then
    fail('CORRUPT', 'the lock key holds ' .. show(raw) .. ', expected a lock state')
  end
  return {
    fence = tonumber(fence),
    count = tonumber(count),
    deadline = tonumber(deadline),
    granted = tonumber(granted),
    waited = waited == '1',
    owner = owner,
  }
end

-- Whether `state` is a live hold at now_ms.
local function is_live(state, now_ms)
  return state ~= nil and state.count >= 1 and state.deadline > now_ms
end

-- Writes `state` (SET replaces any type and the key has no expiry: cannot fail).
local function write_state(state)
  redis.call('SET', K_LOCK, decimal(state.fence) .. ' ' .. decimal(state.count) .. ' '
    .. decimal(state.deadline) .. ' ' .. decimal(state.granted) .. ' '
    .. (state.waited and '1 ' or '0 ') .. state.owner)
end

-- The wake list of the fair waiter `token`: lock-waiter:<token>:<name>, next to K_LOCK (nil if
-- K_LOCK is not named luasched:{ns}:lock:<name>; then only the timed retry wakes that waiter).
local function waiter_wake_key(token)
  local tag_end = string.find(K_LOCK, '}:lock:', 1, true)
  if not tag_end then
    return nil
  end
  return string.sub(K_LOCK, 1, tag_end + 1) .. 'lock-waiter:' .. token .. ':'
    .. string.sub(K_LOCK, tag_end + 7)
end

-- The wake list to push when the lock frees: the plain lock's list, or the own list of the fair
-- queue's head (its oldest live place other than the caller's), or nil when nobody is to be woken
-- (reads only; checks the list's type).
local function wake_target(token, now_ms)
  if read('ZCARD', K_QUEUE) == 0 then
    local waiting = read('ZCOUNT', K_PLACES, '(' .. decimal(now_ms), '+inf')
    local place = read('ZSCORE', K_PLACES, token)
    if place and tonumber(place) > now_ms then
      waiting = waiting - 1 -- the caller leaves
    end
    if waiting > 0 then
      check_type(K_WAKE, 'list')
      return K_WAKE
    end
    return nil
  end
  local members = read('ZRANGE', K_QUEUE, 0, QUEUE_SCAN - 1)
  local places = read('ZMSCORE', K_PLACES, unpack(members))
  for position, member in ipairs(members) do
    local place_deadline = places[position] and tonumber(places[position])
    if member ~= token and place_deadline and place_deadline > now_ms then
      local key = waiter_wake_key(member)
      if key then
        check_type(key, 'list')
      end
      return key
    end
  end
  return nil
end

local function main()
  key_count(LOCK_KEY_COUNT)
  arg_count(2, 2)
  local token = arg_string(1, 'token', 1, 256)
  local request_id = arg_string(2, 'request_id', 0, 64)
  local now_ms = FAST_NOW_MS or server_now_ms()
  local recorded = recorded_reply(K_REQUEST, request_id)
  if recorded then
    return recorded
  end
  local state = read_state()
  local hold = is_live(state, now_ms) and state or nil
  -- The last grantee releasing a hold it already released: a replay, nothing to do.
  if state and state.owner == token and state.count == 0 then
    return { 'released', 0, now_ms }
  end
  local queued = read('ZSCORE', K_QUEUE, token)
  local place = read('ZSCORE', K_PLACES, token)
  local status, left = 'expired', 0
  if hold and hold.owner == token then
    status, left = 'released', hold.count - 1
  elseif hold then
    status = 'not_owner'
  end
  local changed = status == 'released' or queued ~= false or place ~= false
  local free_after = hold == nil or (status == 'released' and left == 0)
  -- Wake a waiter when the lock is (still) free after a change and some waiter's place is live:
  -- one signal, for the plain lock's waiters (one of them can take it) or the fair queue's head.
  local wake = nil
  if changed and free_after then
    wake = wake_target(token, now_ms)
  end
  -- Writes from here on (none can fail: every key's type was checked above).
  if status == 'released' then
    hold.count = left
    if left == 0 then
      hold.waited = false
    end
    write_state(hold)
  end
  if queued then
    redis.call('ZREM', K_QUEUE, token)
  end
  if place then
    redis.call('ZREM', K_PLACES, token)
  end
  if wake then
    push_wake(wake, 1)
  end
  local reply = { status, left, now_ms }
  if changed then
    record_reply(K_REQUEST, request_id, reply)
  end
  return reply
end

return run(main)
