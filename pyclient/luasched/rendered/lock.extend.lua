--@script     lock.extend
--@summary    Moves the deadline of the hold of `token` to the server's now + ttl_ms (longer or shorter), only
--@+          while `token` owns the lock and its hold has not lapsed: a lapsed hold is never revived (another
--@+          owner may have been granted in between). Keeps the fencing token and the hold count. Idempotent.
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
--@arg        token   string:1..256  The owner token given to lock.acquire.
--@arg        ttl_ms  int:1..31536000000  The new deadline is the server's now + ttl_ms.
--@reply      array{status:string, deadline_ms:int, now_ms:int}  status "extended": deadline_ms = the new deadline
--@+          (server ms). "not_owner": another owner holds the lock (deadline_ms 0). "expired": nobody holds it
--@+          (deadline_ms 0). now_ms: the server's clock at the call.
--@error      ARG  Not 5 keys or 2 arguments, or an argument out of its range.
--@error      CORRUPT  The lock key holds another type or shape than the layout; nothing changed.
--@complexity O(1)
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
local SCRIPT_NAME = 'lock.extend'
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

local function main()
  key_count(LOCK_KEY_COUNT)
  arg_count(2, 2)
  local token = arg_string(1, 'token', 1, 256)
  local ttl_ms = arg_int(2, 'ttl_ms', 1, 31536000000)
  local now_ms = server_now_ms()
  local state = read_state()
  if not is_live(state, now_ms) then
    return { 'expired', 0, now_ms }
  end
  if state.owner ~= token then
    return { 'not_owner', 0, now_ms }
  end
  state.deadline = now_ms + ttl_ms
  write_state(state) -- the only write (K_LOCK was read as a string)
  return { 'extended', state.deadline, now_ms }
end

return run(main)
