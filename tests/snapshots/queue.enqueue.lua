--@script     queue.enqueue
--@summary    Adds a task to a queue, ready now or after delay_ms of the server's clock; idempotent by task id.
--@+          A task id that exists in the queue (ready, delayed, leased or dead) is left exactly as it is and the
--@+          reply says so (created = 0 and its state). Ready tasks are served highest priority first, FIFO within
--@+          a priority. A non-empty request_id records the reply for request_ttl_ms: replaying the same request id
--@+          answers the first reply and acts no second time. The common call (a new task id, request_id "" or one
--@+          not recorded yet, arguments in canonical decimal) takes a lean path (TIME, GET of the record, HMGET,
--@+          EXISTS, ZADD, HSET, SET of the record) before the shared helpers are even defined.
--@key        ready     zset    luasched:{ns}:q:ready:<queue> -- ready task ids, scored (511 - priority) * 2^43 + seq
--@+          (an exact integer below 2^53): highest priority first, FIFO (seq) within a priority; ZRANGE 0 0 is the next task.
--@key        delayed   zset    luasched:{ns}:q:delayed:<queue> -- delayed task ids (and nacked ones waiting for
--@+          their backoff) scored by the server ms at which they become ready.
--@key        leased    zset    luasched:{ns}:q:leased:<queue> -- leased task ids scored by the lease deadline
--@+          (server ms); a lease whose deadline is not after now is reclaimed by the next dequeue.
--@key        dead      zset    luasched:{ns}:q:dead:<queue> -- dead-letter task ids scored by the server ms
--@+          at which they died (max_attempts failed attempts).
--@key        tasks     hash    luasched:{ns}:q:tasks:<queue> -- "p"..task_id -> payload, "m"..task_id -> meta
--@+          "S P M A T W worker_id" (state R|D|L|X = ready|delayed|leased|dead, priority, max_attempts,
--@+          attempts so far, fencing token of the last lease (0: none), state time in server ms: ready
--@+          since / due / lease deadline / died at, then the worker id of the last lease), "r"..task_id ->
--@+          last failure reason; "seq" -> last sequence number, "fence" -> last fencing token (both only grow).
--@key        wake      list    luasched:{ns}:q:wake:<queue> -- wake-up signals for blocked dequeuers (BLPOP
--@+          it); at most 16 entries, expires 2000 ms after a push.
--@key        waiting   string  luasched:{ns}:q:waiting:<queue> -- present while a dequeuer blocks; only
--@+          then do enqueue/nack/promotion push wake-up signals.
--@key        request   string  luasched:{ns}:q:req:<request_id>:<queue> -- the recorded reply of a request id
--@+          (unused when request_id is empty); lives request_ttl_ms.
--@arg        task_id         string:1..1024  The task id: any bytes, unique within the queue while the task exists.
--@arg        payload         string:0..16777216  The payload: any bytes, handed to the worker that leases it.
--@arg        priority        int:-512..511  Higher first.
--@arg        delay_ms        int:0..31536000000  The task becomes ready at the server's now + delay_ms (0: now).
--@arg        max_attempts    int:1..1000000  Leases it may take; after that many failed ones it goes to the dead letters.
--@arg        request_id      string:0..64  Idempotency key of this call, [0-9A-Za-z_-] ("": none); also part of the request key name.
--@arg        request_ttl_ms  int:1..86400000  How long the reply of request_id is kept.
--@reply      array{created:int:0..1, state:string}  created = 1: the task was added, state "ready" or "delayed";
--@+          created = 0: the id exists, state is its state ("ready", "delayed", "leased" or "dead"), nothing changed.
--@error      ARG  Not 8 keys or 7 arguments, an argument out of its range, or a request id used by another call.
--@error      CORRUPT  A key of the queue holds another type or shape than the layout; nothing changed.
--@complexity O(log n) for n tasks in the queue
--@since      6.2

-- The lean path: the call the wrapper makes for q.enqueue(id, payload) (8 KEYS, 7 ARGV in their
-- canonical form, a task id the queue does not hold, request_id "" or one with no record yet,
-- delay_ms 0 or > 0). It runs before the helpers below are defined (defining them costs about a
-- quarter of the call). Its checks accept only arguments main() accepts too (no leading zeros,
-- no "-0"...); anything else, an existing task id, a recorded request id, a seq main() would
-- call CORRUPT or exhausted, or a key of another type (redis.pcall: an error table) goes on to
-- main(), which answers it (with FAST_NOW_MS: TIME is read once per call). It reads everything
-- before its first write, a ZADD through redis.pcall: if that fails (not a zset) nothing was
-- written and main() answers CORRUPT; the later writes hit keys already read (HMGET, LLEN) or
-- SET. It writes what main() writes, byte for byte: the record is cmsgpack.pack of
-- {'enqueue', 1, state} spelled out, the meta format_meta()'s string, the numbers passed as
-- main() passes them (scores up to 2^53 - 1 are formatted by Redis, exactly).
local FAST_NOW_MS = nil
if #KEYS == 8 and #ARGV == 7 then
  local task_id, payload, priority, delay, attempts, request_id, request_ttl =
    ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  if #task_id >= 1 and #task_id <= 1024 and #payload <= 16777216
    and #priority <= 4 and #delay <= 11 and #attempts <= 7 and #request_ttl <= 8
    and #request_id <= 64
    and (priority == '0' or string.find(priority, '^%-?[1-9]%d*$'))
    and (delay == '0' or string.find(delay, '^[1-9]%d*$'))
    and string.find(attempts, '^[1-9]%d*$') and string.find(request_ttl, '^[1-9]%d*$')
    and string.find(request_id, '^[%w_%-]*$') then
    local priority_n, delay_n = tonumber(priority), tonumber(delay)
    if priority_n >= -512 and priority_n <= 511 and delay_n <= 31536000000
      and tonumber(attempts) <= 1000000 and tonumber(request_ttl) <= 86400000 then
      local time = redis.call('TIME')
      local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
      FAST_NOW_MS = now_ms
      -- false: no record (an error table or a string goes to main()).
      local record = request_id ~= '' and redis.pcall('GET', KEYS[8])
      local fields = record == false and redis.pcall('HMGET', KEYS[5], 'm' .. task_id, 'seq')
      local seq = nil
      if fields and fields[1] == false then
        local raw = fields[2]
        if raw == false then
          seq = 0
        elseif #raw <= 17 and string.find(raw, '^%d+$') then
          seq = tonumber(raw)
        end
      end
      -- A waiting dequeuer: LLEN checks the wake list's type before the first write.
      local waiting = seq and redis.call('EXISTS', KEYS[7]) == 1
      if waiting and type(redis.pcall('LLEN', KEYS[6])) ~= 'number' then
        seq = nil
      end
      local state, written = nil, nil
      if seq and delay == '0' then
        seq = seq + 1
        if seq <= 8796093022207 then
          state = 'ready'
          written = type(redis.pcall('ZADD', KEYS[1], (511 - priority_n) * 8796093022208 + seq, task_id)) == 'number'
          if written then
            -- Plain concatenation: now_ms is an integer below 1e14 ("%.14g" is exact).
            redis.call('HSET', KEYS[5], 'p' .. task_id, payload,
              'm' .. task_id, 'R ' .. priority .. ' ' .. attempts .. ' 0 0 ' .. now_ms .. ' ', 'seq', seq)
          end
        end
      elseif seq then
        local at_ms = now_ms + delay_n
        state = 'delayed'
        written = type(redis.pcall('ZADD', KEYS[2], at_ms, task_id)) == 'number'
        if written then
          redis.call('HSET', KEYS[5], 'p' .. task_id, payload,
            'm' .. task_id, 'D ' .. priority .. ' ' .. attempts .. ' 0 0 ' .. at_ms .. ' ')
        end
      end
      if written then
        if waiting then
          if redis.call('LPUSH', KEYS[6], '1') > 16 then
            redis.call('LTRIM', KEYS[6], '0', '15')
          end
          redis.call('PEXPIRE', KEYS[6], '2000')
        end
        if request_id ~= '' then
          -- cmsgpack.pack({ 'enqueue', 1, state }), as record_reply() writes it.
          redis.call('SET', KEYS[8], state == 'ready' and '\147\167enqueue\1\165ready'
            or '\147\167enqueue\1\167delayed', 'PX', request_ttl)
        end
        return { 1, state }
      end
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
local SCRIPT_NAME = 'queue.enqueue'
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
    local layout, culprit = { 'zset', 'zset', 'zset', 'zset', 'hash', 'list', 'string', 'string' }, 'a key'
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
-- queue (lua/include/queue.lua.j2): the keys of one task queue and the helpers of the queue.*
-- scripts.
--
-- Every queue.* script takes the same 8 KEYS, in this order (all under the namespace's hash
-- tag, so one cluster slot; the queue name is arbitrary bytes and only ever the tail of a key
-- name, after a fixed kind, so two queues never share a key):
--   1 q:ready:<queue>     ZSET   ready task ids by (511 - priority) * 2^43 + seq
--   2 q:delayed:<queue>   ZSET   delayed task ids by due time (server ms)
--   3 q:leased:<queue>    ZSET   leased task ids by lease deadline (server ms)
--   4 q:dead:<queue>      ZSET   dead letters by time of death (server ms)
--   5 q:tasks:<queue>     HASH   "p"..id payload, "m"..id meta, "r"..id reason, "seq", "fence"
--   6 q:wake:<queue>      LIST   wake-up signals for blocked dequeuers
--   7 q:waiting:<queue>   STRING present while a dequeuer blocks
--   8 q:req:<request_id>:<queue>  STRING recorded reply of a request id
-- Task ids are arbitrary bytes: they are only ever zset members and (after a one-byte prefix)
-- hash fields, never part of a key name.
--
-- Invariants the scripts rely on (and keep):
--   * A task exists exactly while its meta field "m"..id exists; then it is in exactly one of
--     ready, delayed, leased, dead, the one its meta's state letter names (R, D, L, X), and its
--     payload field exists. Finished (acked) tasks leave no trace.
--   * Score budget of ready: priority in [-512, 511] gives a band
--     511 - priority in [0, 1023] (10 bits), seq in [1, 2^43 - 1] (43 bits):
--     band * 2^43 + seq <= 2^53 - 1, an exact integer in a double. Lower score = served first.
--   * "seq" and "fence" (fields of the tasks hash, never deleted) only grow: each task that
--     becomes ready takes seq + 1, each lease takes fence + 1 as its fencing token.
--   * A lease is current while the task is leased with that token; it stays current after its
--     deadline until a dequeue reclaims it (an expired lease = a failed attempt).
--   * Reads go through read(), which turns WRONGTYPE into CORRUPT; every key a script writes was
--     read (or is written by SET/PEXPIRE, which cannot fail) before the first write, and the
--     first write goes through first_write(), so a refused call changes no key.
-- ---------------------------------------------------------------------------------------------
-- (The dispatch scripts bind these names to their own KEYS first: include/dispatch.lua.j2.)
local K_READY, K_DELAYED, K_LEASED, K_DEAD = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_TASKS, K_WAKE, K_WAITING, K_REQUEST = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local QUEUE_KEY_COUNT = 8
local MIN_PRIORITY = -512
local MAX_PRIORITY = 511
local SEQ_SPAN = 8796093022208
local MAX_SEQ = 8796093022207
local MAX_TASK_ID_BYTES = 1024
local MAX_TTL_MS = 31536000000
local MAX_REQUEST_TTL_MS = 86400000
local WAKE_MAX = 16
local WAKE_TTL_MS = 2000
local STATE_NAMES = { R = 'ready', D = 'delayed', L = 'leased', X = 'dead' }
local floor = math.floor

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
-- The first write of a script: if it fails (a key of another type), nothing was changed yet.
local first_write = read

-- ARGV[index] as a request id: 0..64 bytes of [0-9A-Za-z_-] ("" = none).
local function arg_request_id(index)
  local raw = arg_string(index, 'request_id', 0, 64)
  if not string.find(raw, '^[%w_%-]*$') then
    fail('ARG', 'request_id may hold only letters, digits, "_" and "-", got ' .. show(raw))
  end
  return raw
end

-- A stored integer (seq, fence): nil stays nil, anything but a plain decimal is CORRUPT.
local function stored_int(raw, what)
  if not raw then
    return nil
  end
  if #raw > 17 or not string.find(raw, '^%d+$') then
    fail('CORRUPT', what .. ' holds ' .. show(raw) .. ', expected an integer')
  end
  return tonumber(raw)
end

-- The meta of a task "S P M A T W worker_id" as a table, or CORRUPT.
local function parse_meta(raw, task_id)
  local state, priority, max_attempts, attempts, token, at_ms, worker =
    string.match(raw, '^([RDLX]) (%-?%d+) (%d+) (%d+) (%d+) (%d+) (.*)$')
  if not state then
    fail('CORRUPT', 'task ' .. show(task_id) .. ' has a malformed meta ' .. show(raw))
  end
  return {
    state = state,
    priority = tonumber(priority),
    max_attempts = tonumber(max_attempts),
    attempts = tonumber(attempts),
    token = tonumber(token),
    at_ms = tonumber(at_ms),
    worker = worker,
  }
end

-- One string.format call (cheaper than a decimal() per field); %d is a 64-bit integer here.
-- (The worker id is appended with `..`: Lua 5.1's '%s' would cut one below 100 bytes at a NUL.)
local function format_meta(meta)
  return string.format('%s %d %d %d %d %d ', meta.state, meta.priority, meta.max_attempts,
    meta.attempts, meta.token, meta.at_ms) .. meta.worker
end

-- The score of a ready task (see the budget above).
local function ready_score(priority, seq)
  return (MAX_PRIORITY - priority) * SEQ_SPAN + seq
end

-- Fails unless `seq` (the last sequence number after this call) fits its 43 bits.
local function check_seq(seq)
  if seq > MAX_SEQ then
    fail('CORRUPT', 'the sequence of the queue is exhausted (2^43 - 1)')
  end
end

-- The recorded reply of `request_id` for operation `op`, or nil (none, or no request id).
local function recorded(request_id, op)
  if request_id == '' then
    return nil
  end
  local raw = read('GET', K_REQUEST)
  if not raw then
    return nil
  end
  local ok, record = pcall(cmsgpack.unpack, raw)
  if not ok or type(record) ~= 'table' or type(record[1]) ~= 'string' then
    fail('CORRUPT', 'the request record is malformed')
  end
  if record[1] ~= op then
    fail('ARG', 'request id ' .. show(request_id) .. ' was used by another call (' .. record[1] .. ')')
  end
  return record
end

-- Records `record` (a list, record[1] = op) for `request_id` (a write: SET cannot fail).
local function record_reply(request_id, ttl_ms, record)
  if request_id ~= '' then
    redis.call('SET', K_REQUEST, cmsgpack.pack(record), 'PX', ttl_ms)
  end
end

-- Whether a dequeuer blocks on the waiting marker `waiting` now, reads only, before the first write; it also checks the type of the wake list `wake`.
local function waiters_present(waiting, wake)
  if redis.call('EXISTS', waiting) == 0 then
    return false
  end
  if type(redis.pcall('LLEN', wake)) ~= 'number' then
    fail('CORRUPT', 'key ' .. show(wake) .. ' holds another type than the layout')
  end
  return true
end

-- Pushes `count` wake-up signals `signal` (absent: "1"; at most WAKE_MAX) on the list `wake`
-- and keeps it short and short-lived. Cannot fail once the list's type was read.
local function push_wake(wake, count, signal)
  local signals = {}
  for position = 1, math.min(count, WAKE_MAX) do
    signals[position] = signal or '1'
  end
  local length = redis.call('LPUSH', wake, unpack(signals))
  if length > WAKE_MAX then
    redis.call('LTRIM', wake, 0, WAKE_MAX - 1)
  end
  redis.call('PEXPIRE', wake, WAKE_TTL_MS)
end

local function main()
  key_count(QUEUE_KEY_COUNT)
  arg_count(7, 7)
  local task_id = arg_string(1, 'task_id', 1, MAX_TASK_ID_BYTES)
  local payload = arg_string(2, 'payload', 0, 16777216)
  local priority = arg_int(3, 'priority', MIN_PRIORITY, MAX_PRIORITY)
  local delay_ms = arg_int(4, 'delay_ms', 0, MAX_TTL_MS)
  local max_attempts = arg_int(5, 'max_attempts', 1, 1000000)
  local request_id = arg_request_id(6)
  local request_ttl_ms = arg_int(7, 'request_ttl_ms', 1, MAX_REQUEST_TTL_MS)
  local now_ms = FAST_NOW_MS or server_now_ms()
  local record = recorded(request_id, 'enqueue')
  if record then
    return { record[2], record[3] }
  end

  local fields = read('HMGET', K_TASKS, 'm' .. task_id, 'seq')
  if fields[1] then
    -- A live id: nothing changes (the reply is recorded, so a replay answers the same).
    local reply = { 0, STATE_NAMES[parse_meta(fields[1], task_id).state] }
    record_reply(request_id, request_ttl_ms, { 'enqueue', reply[1], reply[2] })
    return reply
  end
  local seq = stored_int(fields[2], 'the seq field') or 0
  local waiting = waiters_present(K_WAITING, K_WAKE)
  local meta = { priority = priority, max_attempts = max_attempts, attempts = 0, token = 0, worker = '' }
  local state
  if delay_ms == 0 then
    seq = seq + 1
    check_seq(seq)
    meta.state, meta.at_ms, state = 'R', now_ms, 'ready'
    first_write('ZADD', K_READY, ready_score(priority, seq), task_id)
    redis.call('HSET', K_TASKS, 'p' .. task_id, payload, 'm' .. task_id, format_meta(meta),
      'seq', seq)
  else
    -- A delayed task takes its sequence number when it becomes ready.
    meta.state, meta.at_ms, state = 'D', now_ms + delay_ms, 'delayed'
    first_write('ZADD', K_DELAYED, meta.at_ms, task_id)
    redis.call('HSET', K_TASKS, 'p' .. task_id, payload, 'm' .. task_id, format_meta(meta))
  end
  -- A blocked dequeuer wakes for a delayed task too: it may be due before the time it waits for.
  if waiting then
    push_wake(K_WAKE, 1)
  end
  record_reply(request_id, request_ttl_ms, { 'enqueue', 1, state })
  return { 1, state }
end

return run(main)
