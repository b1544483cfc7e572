--@script     lock.acquire
--@summary    Tries once to take the lock for the owner `token` for ttl_ms of the server's clock; answers at once.
--@+          Granted when the lock is free (never taken, released, or its deadline passed), with a fencing token
--@+          max(last one granted for this name + 1, the server's clock in us): it only grows, and a promoted
--@+          replica that missed the last grants still hands out larger ones (docs/guarantees.md).
--@+          The owner itself: reentrant=1 adds a hold (release as many times; same fencing token) and moves the
--@+          deadline to at least now + ttl_ms. reentrant=0: the token is single-use and is its own idempotency
--@+          key: an acquire whose token got the lock's last grant is a replay and answers that grant unchanged
--@+          (even once released or lapsed; never a second grant), until another token is granted.
--@+          A refused caller with wait_ttl_ms > 0 takes (or renews) a waiter's place that lapses wait_ttl_ms
--@+          after this call unless it calls again; while a place is live, a release pushes wake-up signals.
--@+          fair=1: the places form a FIFO queue and a free lock goes to the oldest live place, so a waiter that
--@+          died blocks the others at most until its place lapses. wait_ttl_ms=0: a try that takes no place.
--@+          Do not mix fair and non-fair acquires on one lock name. A non-empty request_id records a grant: replaying
--@+          the same request id (within 60000 ms) answers the first reply and acts no second time
--@+          (what reentrant acquires need). The common calls take a lean path before the shared helpers are even
--@+          defined: a free lock for reentrant=0, fair=0, request_id "" (TIME, GET, ZSCORE, SET), for fair=1 with an
--@+          empty queue (TIME, GET, ZCARD, SET), and for reentrant=1, fair=0 with a request id of 32 bytes (the
--@+          same calls and a GET and a SET of the request record).
--@key        lock        string  luasched:{ns}:lock:<name> -- the lock's state, "<fence> <count> <deadline>
--@+          <granted> <waited> <owner>": the last fencing token granted, the owner's holds (0: released), the
--@+          deadline and grant time (server ms), 1 if a waiter was refused during the hold, the last grantee's
--@+          token. Never expires (it carries the fence, which keeps growing across holds); the hold is live while
--@+          count >= 1 and deadline > now.
--@key        queue       zset    luasched:{ns}:lock-queue:<name> -- fair waiters (token) scored by arrival order.
--@key        places      zset    luasched:{ns}:lock-places:<name> -- waiters (token; fair or not) scored by the
--@+          server ms at which their place lapses unless renewed by another acquire. A release wakes waiters
--@+          while some place is live.
--@key        wake        list    luasched:{ns}:lock-wake:<name> -- wake-up signals, pushed when the lock frees
--@+          while someone waits (BLPOP it between attempts); expires 1000 ms after a push. A
--@+          non-fair lock's signal is "1"; a fair lock's is the token of the queue's head. A fair waiter BLPOPs its
--@+          own list luasched:{ns}:lock-waiter:<token>:<name> and this one; a signal naming another token it passes
--@+          on to that token's own list (LPUSH, LTRIM 0 15, PEXPIRE 1000). No script touches the
--@+          own lists.
--@key        request     string  luasched:{ns}:lock-req:<request_id>:<name> -- the recorded reply of a request
--@+          id (unused when request_id is empty); lives 60000 ms.
--@arg        token        string:1..256  The owner: random bytes drawn by the client, the proof of ownership.
--@arg        ttl_ms       int:1..31536000000  How long the hold lasts, from the server's now.
--@arg        reentrant    enum:0|1  1: the owner may hold the lock several times (count).
--@arg        fair         enum:0|1  1: FIFO grant order through the waiters' queue.
--@arg        wait_ttl_ms  int:0..31536000000  How long the caller's waiter place lasts if refused (0: take no place); longer than the caller's pause between attempts.
--@arg        request_id   string:0..64  Idempotency key, unique per attempt ("" for none); it is also part of the request key name.
--@reply      array{status:string, fence:int, deadline_ms:int, count:int, wait_ms:int, position:int, now_ms:int}
--@+          status "acquired": fence = the hold's fencing token, deadline_ms = its deadline (server ms), count = holds
--@+          of this owner (>= 1), wait_ms = 0, position = 0. status "held": someone else holds it; fence = 0,
--@+          deadline_ms = the holder's deadline, count = 0, wait_ms = ms until it lapses (>= 1), position = the
--@+          caller's place in the fair queue (1 = next; 0 = none). status "queued" (fair only): the lock is free but
--@+          older waiters come first; deadline_ms = 0, wait_ms = 0, position as for "held". now_ms is the server's
--@+          clock at the call (the start of the hold when acquired).
--@error      ARG  Not 5 keys or 6 arguments, or an argument out of its range.
--@error      CORRUPT  A key of the lock holds another type or shape than the layout; nothing changed.
--@complexity O(log n) for fair=0; O(64 + log n) for fair=1; n waiters
--@since      6.2
-- ---------------------------------------------------------------------------------------------
-- keys (lua/include/keys.lua.j2): all KEYS belong to one namespace, each of the kind its --@key
-- line names. Generated by render.py (key_kinds) from the header and placed right after it, so
-- it runs first, before any lean path and before the includes' helpers are defined.
--
-- Invariants:
--   * KEYS[1] starts with "luasched:{<ns>}:", ns at least one byte without "{" or "}" (the
--     first "}" after the opening brace closes the hash tag). That prefix is the namespace.
--   * KEYS[i] starts with that exact prefix followed by the fixed part of its pattern up to the
--     first <placeholder> (its kind, e.g. "q:tasks:"); it is exactly prefix .. kind when the
--     pattern has none. A pattern that is kind .. <p> (one placeholder, at the end) names the
--     same <p> in every such key of the call: the first one's rest is the value, the others
--     must be prefix .. kind .. value (render.py key_kinds says which mode each key gets).
--     So no KEYS entry belongs to another namespace or another queue/lock, and a namespace
--     holding a brace cannot pass off its keys as another namespace's (they would not all
--     parse as one).
--   * Plain string comparisons (string.sub, .., ==) and one constant pattern (with KEYS[1]'s
--     kind when its value names the others: one string.match splits it): no pattern is built
--     from user data.
--     Lua interns strings, so `key ~= prefix .. kind .. value` costs one concatenation that
--     finds the existing KEYS string, no C call: ~1,000 server instructions per key.
--   * A refusal answers LUASCHED_ARG before anything is read or written. Positions past #KEYS
--     are not checked: the key count is main()'s check (key_count), which answers ARG too.
-- ---------------------------------------------------------------------------------------------
do
  local keys, sub = KEYS, string.sub
  local first = keys[1]
  if first then
    -- KEYS[1] is "luasched:{<ns>}:" .. its kind .. its value (ns one byte or more without
    -- braces): one constant pattern (nothing of the key goes into a pattern) captures the
    -- prefix and the value at once; the string.find below only tells a refusal's reason.
    local prefix, tail_name = string.match(first, '^(luasched:{[^{}]+}:)lock:(.*)$')
    if not prefix then
      if not string.find(first, '^luasched:{[^{}]+}:') then
        return redis.error_reply('LUASCHED_ARG lock.acquire: KEYS[1] must start with luasched:{<namespace>}: (a namespace of at least one byte, without { or })')
      end
      return redis.error_reply('LUASCHED_ARG lock.acquire: KEYS[1] must be luasched:{ns}:lock:<name> in the namespace of KEYS[1]')
    end
    local plen = #prefix
    local key
    key = keys[2]
    if key and key ~= prefix .. 'lock-queue:' .. tail_name then
      return redis.error_reply('LUASCHED_ARG lock.acquire: KEYS[2] must be luasched:{ns}:lock-queue:<name> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[3]
    if key and key ~= prefix .. 'lock-places:' .. tail_name then
      return redis.error_reply('LUASCHED_ARG lock.acquire: KEYS[3] must be luasched:{ns}:lock-places:<name> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[4]
    if key and key ~= prefix .. 'lock-wake:' .. tail_name then
      return redis.error_reply('LUASCHED_ARG lock.acquire: KEYS[4] must be luasched:{ns}:lock-wake:<name> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[5]
    if key and (sub(key, 1, plen) ~= prefix or sub(key, plen + 1, plen + 9) ~= 'lock-req:') then
      return redis.error_reply('LUASCHED_ARG lock.acquire: KEYS[5] must be luasched:{ns}:lock-req:<request_id>:<name> in the namespace of KEYS[1]')
    end
  end
end

-- The lean path: a grant of a free lock in the three calls the wrapper makes for
-- s.lock(name).acquire(): a plain lock (reentrant=0, fair=0, no request id), a fair lock whose
-- queue is empty (fair=1, no request id: the full path grants the same), and a reentrant lock
-- (reentrant=1, fair=0, a request id of the wrapper's 32 bytes: luasched.keys.new_request_id).
-- It runs before the helpers below are defined: on a 2-core bench box, defining them costs about
-- as much as the whole grant. Its checks accept only arguments that main() accepts too (a
-- subset: ttl_ms without leading zeros, request ids of 32 bytes...); anything else, a lock that
-- is held, a replay (a plain lock whose owner is the caller, a request id already recorded), a
-- fair queue with waiters, or a key main() would call CORRUPT goes on to main(), which answers
-- it (with FAST_NOW_MS/US: TIME is read once per call). It reads everything before its writes,
-- and its writes (SET of the lock key, ZREM of the caller's place, whose type ZSCORE checked,
-- SET of the request record) cannot fail on a key's type. Cheap forms (counted with callgrind,
-- docs/locks.md): strings that are decimals by their pattern are turned into numbers by
-- arithmetic (`s + 0`: the same conversion as tonumber, without a function call), TIME's two
-- fields are converted once each (now_ms from now_us by arithmetic, no math.floor), and the new
-- state is one string.format of integers ('%d': an integer snprintf; concatenating a number
-- costs a "%.14g" one, twice as much). The token is appended with `..` (string.format's %s
-- would cut it at a zero byte).
local FAST_NOW_MS, FAST_NOW_US = nil, nil
if #KEYS == 5 and #ARGV == 6 then
  local token, ttl_raw, reentrant_raw, fair_raw, wait_raw, request_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
  local reentrant = reentrant_raw == '1' and fair_raw == '0' and #request_id == 32
  -- Up to 10 digits: within 1..max_ttl_ms (31536000000) with no comparison.
  if (reentrant or (reentrant_raw == '0' and request_id == '' and (fair_raw == '0' or fair_raw == '1')))
    and #token >= 1 and #token <= 256 and #ttl_raw <= 10 and #wait_raw <= 10
    and string.find(ttl_raw, '^[1-9]%d*$')
    and (wait_raw == '0' or string.find(wait_raw, '^%d+$'))
    -- A reentrant acquire: no reply recorded for the request id (a replay, or a key of another
    -- type: an error table, goes to main()).
    and not (reentrant and redis.pcall('GET', KEYS[5])) then
    local time = redis.call('TIME')
    local now_us = (time[1] * 1000000 + time[2])
    -- now_us is an integer below 2^53: now_us % 1000 and the division are exact.
    local now_ms = (now_us - now_us % 1000) / 1000
    FAST_NOW_MS, FAST_NOW_US = now_ms, now_us
    local raw = redis.pcall('GET', KEYS[1])
    local fence, count, deadline, granted, owner, free
    if raw == false then
      fence, free = 0, true
    elseif type(raw) == 'string' then
      fence, count, deadline, granted, owner = string.match(raw, '^(%d+) (%d+) (%d+) (%d+) [01] (.+)$')
      -- Numbers of up to 15 digits are below 2^53 whatever they are; longer
      -- ones go to main(), whose read_state answers CORRUPT past 2^53 - 1 (so does a fencing token
      -- past it: below, main()'s next_fence). A plain acquire by the last grantee is a replay
      -- (main() answers it); a reentrant owner whose hold is free is granted anew, as by main().
      free = fence ~= nil and #fence <= 16 and #count < 16 and #deadline < 16
        and #granted < 16 and (reentrant or owner ~= token)
        and (count == '0' or deadline + 0 <= now_ms)
      fence = free and fence + 0
    end
    -- The fencing token: main()'s next_fence (include/fence.j2).
    local granted_fence = free and (fence < now_us and now_us or fence + 1)
    if free and granted_fence > 9007199254740991 then
      free = false
    end
    local place = nil
    if free then
      if fair_raw == '1' then
        -- Fair: only with nobody queued (main() grants the same then, and leaves the places
        -- alone); an error (not a zset) is main()'s CORRUPT.
        free = redis.pcall('ZCARD', KEYS[2]) == 0
      else
        -- A waiter's place to give back, whatever wait_ttl_ms is: a waiter's attempt right after a
        -- wake-up sends 0 (luasched/lock.py place_ttl_ms) and still has its place, which main() removes.
        place = redis.pcall('ZSCORE', KEYS[3], token)
        free = type(place) ~= 'table' -- an error (not a zset): main() answers CORRUPT
      end
    end
    if free then
      local deadline_ms = now_ms + ttl_raw
      -- Every number here is an integer below 2^53: '%d' writes it exactly.
      local state = string.format('%d 1 %d %d 0 ', granted_fence, deadline_ms, now_ms) .. token
      redis.call('SET', KEYS[1], state)
      if place then
        redis.call('ZREM', KEYS[3], token)
      end
      if reentrant then
        -- main()'s record_reply of this reply (include/lock.lua.j2).
        redis.call('SET', KEYS[5], string.format('acquired %d %d 1 0 0 %d', granted_fence, deadline_ms, now_ms), 'PX', '60000')
      end
      return { 'acquired', granted_fence, deadline_ms, 1, 0, 0, now_ms }
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
local SCRIPT_NAME = 'lock.acquire'
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

-- The server's clock in ms, and (second value) in us for fencing tokens, from one reading. Read
-- it once, at the top of a script: TIME is frozen inside a script on 7.2+ and advances on 7.0,
-- so a second reading could disagree with the first.
local function server_now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000), (time[1] * 1000000 + time[2])
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
-- nothing was written yet. Any other error (OOM, NOPERM...) propagates unchanged. Every script
-- that takes KEYS gets that conversion and declares CORRUPT (render.py refuses a header without).
-- ---------------------------------------------------------------------------------------------
local read = redis.call
-- Fails with CORRUPT unless `key` is absent or of `expected` type.
local function check_type(key, expected)
  local found = redis.call('TYPE', key).ok
  if found ~= 'none' and found ~= expected then
    fail('CORRUPT', 'key ' .. show(key) .. ' holds a ' .. found .. ', expected a ' .. expected)
  end
end

-- A stored integer field, sign allowed (a request record's numbers): absent (nil/false) gives
-- nil, anything but a plain decimal is CORRUPT.
local function stored_int_or_nil(raw, what)
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
    reply[#reply + 1] = #reply == 0 and field or stored_int_or_nil(field, 'the request record')
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

-- ---------------------------------------------------------------------------------------------
-- wake (lua/include/wake.lua.j2): the wake-up signals of blocked callers (a LIST they BLPOP),
-- one rule for every area. Included by queue.lua.j2 and lock.lua.j2, which bind WAKE_MAX (most
-- signals kept) and WAKE_TTL_MS (the list expires that long after a push) from their limits.
-- ---------------------------------------------------------------------------------------------

-- ---------------------------------------------------------------------------------------------
-- fence (lua/include/fence.lua.j2): fencing tokens, for the scripts that hand them out (lock
-- fences, semaphore permits, queue and node-queue lease tokens). Included by lock.lua.j2 and
-- queue.lua.j2; the rule's one spelling is include/fence.j2 (the lean paths inline it).
--
-- Invariant: a token is max(last + 1, the server's clock in us), so tokens only grow on one
-- server, and a promoted replica that missed the last grants still hands out larger ones as
-- long as its clock is ahead of the old primary's tokens (docs/guarantees.md, "Fencing tokens").
-- ---------------------------------------------------------------------------------------------
-- The first of `count` fencing tokens a call hands out after `last` (the last one stored), at
-- the server's us `now_us`: max(last + 1, now_us), the rest following one by one
-- (include/fence.j2; docs/guarantees.md: why a promoted replica that missed the last grants
-- still hands out larger ones). A read: call it before the first write. CORRUPT (`what`: the
-- stored field) when the last of them would pass 2^53 - 1.
local function first_token(last, now_us, count, what)
  local first = (last < now_us and now_us or last + 1)
  if first + count - 1 > MAX_SAFE_INTEGER then
    fail('CORRUPT', what .. ' is at its largest value')
  end
  return first
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
--   4 lock-wake:<name>    LIST   wake-up signals: "1" (non-fair), the head's token (fair)
--   5 lock-req:<request_id>:<name>  STRING recorded reply of a request id
-- A fair waiter also blocks on its own list, lock-waiter:<token>:<name>, which no script touches:
-- a waiter that pops another token's signal passes it on there (the wrapper does).
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
  local fence, count, deadline, granted, waited, owner = string.match(raw,
    '^(%d+) (%d+) (%d+) (%d+) ([01]) (.+)$')
  if not fence or #fence > 16 or #count > 16 or #deadline > 16
    or #granted > 16 then
    fail('CORRUPT', 'the lock key holds ' .. show(raw) .. ', expected a lock state')
  end
  local state = {
    fence = tonumber(fence),
    count = tonumber(count),
    deadline = tonumber(deadline),
    granted = tonumber(granted),
    waited = waited == '1',
    owner = owner,
  }
  -- Past 2^53 - 1 a number is not exact in Lua (no script writes one): it would be written back
  -- rounded.
  if math.max(state.fence, state.count, state.deadline, state.granted) > 9007199254740991 then
    fail('CORRUPT', 'the lock key holds ' .. show(raw) .. ', a number past 2^53 - 1')
  end
  return state
end

-- Whether `state` is a live hold at now_ms.
local function hold_is_live(state, now_ms)
  return state ~= nil and state.count >= 1 and state.deadline > now_ms
end

-- Writes `state` (SET replaces any type and the key has no expiry: cannot fail).
local function write_state(state)
  redis.call('SET', K_LOCK, decimal(state.fence) .. ' ' .. decimal(state.count) .. ' ' .. decimal(state.deadline) .. ' ' .. decimal(state.granted) .. ' ' .. (state.waited and '1' or '0') .. ' ' .. state.owner)
end


-- Keeps a waiters' zset alive at least `ttl_ms` (queue_ttl_ms: its PTTL, read before the first
-- write; -1 = a key without expiry, left so). The keys vanish once every waiter is gone.
local function keep_alive(key, queue_ttl_ms, ttl_ms)
  if queue_ttl_ms ~= -1 and queue_ttl_ms < ttl_ms then
    redis.call('PEXPIRE', key, ttl_ms)
  end
end
-- The next fencing token, max(last + 1, now_us) (prelude: first_token; a read: call it before
-- the first write).
local function next_fence(state, now_us)
  return first_token(state and state.fence or 0, now_us, 1, 'the lock key\'s fence')
end

-- The write of a grant (cannot fail: SET replaces the key whatever it held).
local function commit_grant(token, ttl_ms, now_ms, fence, waited)
  local deadline_ms = now_ms + ttl_ms
  write_state({ fence = fence, count = 1, deadline = deadline_ms, granted = now_ms, waited = waited,
    owner = token })
  return { 'acquired', fence, deadline_ms, 1, 0, 0, now_ms }
end

-- Marks a live hold as waited for (a refused waiter takes a place): its release wakes waiters.
local function mark_waited(state)
  if not state.waited then
    state.waited = true
    write_state(state)
  end
end

local function main()
  key_count(LOCK_KEY_COUNT)
  arg_count(6, 6)
  local token = arg_string(1, 'token', 1, 256)
  local ttl_ms = arg_int(2, 'ttl_ms', 1, 31536000000)
  local reentrant = arg_enum(3, 'reentrant', { '0', '1' }) == '1'
  local fair = arg_enum(4, 'fair', { '0', '1' }) == '1'
  local wait_ttl_ms = arg_int(5, 'wait_ttl_ms', 0, 31536000000)
  local request_id = arg_string(6, 'request_id', 0, 64)
  local now_ms, now_us = FAST_NOW_MS, FAST_NOW_US
  if not now_ms then
    now_ms, now_us = server_now_ms()
  end
  local recorded = recorded_reply(K_REQUEST, request_id)
  if recorded then
    return recorded
  end
  local state = read_state()
  local hold = hold_is_live(state, now_ms) and state or nil

  -- A plain acquire whose token got the last grant is a replay: the first grant's reply, no change.
  if not reentrant and state and state.owner == token then
    return { 'acquired', state.fence, state.deadline, math.max(state.count, 1), 0, 0, state.granted }
  end
  -- The reentrant owner again: one more hold, same fence; never shortens the hold.
  if hold and hold.owner == token then
    hold.count = hold.count + 1
    hold.deadline = math.max(hold.deadline, now_ms + ttl_ms)
    write_state(hold)
    local reply = { 'acquired', hold.fence, hold.deadline, hold.count, 0, 0, now_ms }
    record_reply(K_REQUEST, request_id, reply)
    return reply
  end

  if not fair then
    local place = read('ZSCORE', K_PLACES, token)
    if hold then
      if wait_ttl_ms > 0 then
        -- A waiter's place: while one is live, the release of a waited-for hold wakes a waiter.
        local places_ttl_ms = read('PTTL', K_PLACES)
        redis.call('ZADD', K_PLACES, decimal(now_ms + wait_ttl_ms), token)
        keep_alive(K_PLACES, places_ttl_ms, wait_ttl_ms)
        mark_waited(hold)
      end
      return { 'held', 0, hold.deadline, 0, hold.deadline - now_ms, 0, now_ms }
    end
    local fence = next_fence(state, now_us)
    if place then
      redis.call('ZREM', K_PLACES, token)
    end
    local reply = commit_grant(token, ttl_ms, now_ms, fence, false)
    record_reply(K_REQUEST, request_id, reply)
    return reply
  end

  -- Fair: the head of the queue is its oldest live place (the caller's own place is live: it is
  -- renewing it now). Leading lapsed places are removed, at most QUEUE_SCAN per call; when all
  -- QUEUE_SCAN scanned places lapsed, nobody is granted and the next call scans further.
  local members = read('ZRANGE', K_QUEUE, 0, QUEUE_SCAN - 1)
  local lapsed = {}
  local head = nil
  if #members > 0 then
    local places = read('ZMSCORE', K_PLACES, unpack(members))
    for position, member in ipairs(members) do
      local place_deadline = places[position] and tonumber(places[position])
      if member == token or (place_deadline and place_deadline > now_ms) then
        head = member
        break
      end
      lapsed[#lapsed + 1] = member
    end
  end
  local queued = read('ZRANK', K_QUEUE, token)
  local my_turn = head == token or (head == nil and #members < QUEUE_SCAN)

  if not hold and my_turn then
    local fence = next_fence(state, now_us)
    -- Others still queued after this grant: its release must wake the next head.
    local others = #members > 0 and read('ZCARD', K_QUEUE) - #lapsed - (queued and 1 or 0) > 0
    -- Writes from here on.
    if #lapsed > 0 then
      redis.call('ZREM', K_QUEUE, unpack(lapsed))
      redis.call('ZREM', K_PLACES, unpack(lapsed))
    end
    if queued then
      redis.call('ZREM', K_QUEUE, token)
      redis.call('ZREM', K_PLACES, token)
    end
    local reply = commit_grant(token, ttl_ms, now_ms, fence, others)
    record_reply(K_REQUEST, request_id, reply)
    return reply
  end

  -- Refused: take or renew a place (wait_ttl_ms > 0). Lapsed places all precede the caller's.
  local position = 0
  local arrival = nil
  local queue_ttl_ms = nil
  if queued then
    position = queued + 1 - #lapsed
  elseif wait_ttl_ms > 0 then
    check_type(K_PLACES, 'zset')
    local last = read('ZRANGE', K_QUEUE, -1, -1, 'WITHSCORES')
    arrival = (last[2] and tonumber(last[2]) or 0) + 1
    position = read('ZCARD', K_QUEUE) + 1 - #lapsed
  end
  if wait_ttl_ms > 0 then
    queue_ttl_ms = read('PTTL', K_QUEUE)
  end
  -- Writes from here on.
  if #lapsed > 0 then
    redis.call('ZREM', K_QUEUE, unpack(lapsed))
    redis.call('ZREM', K_PLACES, unpack(lapsed))
  end
  if wait_ttl_ms > 0 then
    if arrival then
      redis.call('ZADD', K_QUEUE, decimal(arrival), token)
    end
    redis.call('ZADD', K_PLACES, decimal(now_ms + wait_ttl_ms), token)
    -- The queue keys outlive every place in them (and vanish once all waiters are gone).
    keep_alive(K_QUEUE, queue_ttl_ms, wait_ttl_ms)
    keep_alive(K_PLACES, queue_ttl_ms, wait_ttl_ms)
    if hold then
      mark_waited(hold)
    end
  end
  if hold then
    return { 'held', 0, hold.deadline, 0, hold.deadline - now_ms, position, now_ms }
  end
  return { 'queued', 0, 0, 0, 0, position, now_ms }
end

return run(main)
