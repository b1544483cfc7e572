--@script     queue.dequeue
--@summary    Takes the next `count` ready tasks and leases them to a worker, in one atomic step; optionally acks
--@+          one lease first (ack-and-take-next). Before taking, it promotes up to 16 due delayed tasks
--@+          and reclaims up to 16 expired leases (an expired lease is a failed attempt: the task
--@+          goes back to ready, or to the dead letters once it had max_attempts leases). Each taken task gets
--@+          attempt + 1, a lease deadline of the server's now + lease_ms and a fencing token: the first one
--@+          max(last token of the queue + 1, the server's clock in us), the next ones one by one after it (tokens
--@+          only grow, also when a promoted replica missed the last leases: docs/guarantees.md). When nothing is taken and wait_ms > 0, the caller is registered
--@+          as waiting for wait_ms (enqueue, nack and promotion then push wake-up signals on the wake list) and
--@+          the reply says when the next delayed task is due. A non-empty request_id records the leases taken
--@+          (and the ack): replaying it within request_ttl_ms answers those leases that are still held under the
--@+          same token, takes nothing new and acks nothing again. A call that changed nothing is not recorded.
--@+          The common take (nothing due, no expired lease, ready tasks present, a request id not seen before,
--@+          canonical decimal arguments), with or without an ack, takes a lean path before the shared helpers
--@+          are even defined; it writes and answers exactly what the full path would.
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
--@+          last failure reason; "seq" -> last sequence number, "fence" -> last fencing token (both only grow);
--@+          "layout" -> a fixed text longer than hash-max-listpack-value (keeps the hash a hashtable).
--@key        wake      list    luasched:{ns}:q:wake:<queue> -- wake-up signals for blocked dequeuers (BLPOP
--@+          it); at most 16 entries, expires 2000 ms after a push.
--@key        waiting   string  luasched:{ns}:q:waiting:<queue> -- present while a dequeuer blocks; only
--@+          then do enqueue/nack/promotion push wake-up signals.
--@key        request   string  luasched:{ns}:q:req:<request_id>:<queue> -- the recorded reply of a request id
--@+          (unused when request_id is empty); lives request_ttl_ms.
--@arg        worker_id       string:0..256  Who takes the tasks (stored with the lease, for humans).
--@arg        count           int:1..1000  Most tasks to take.
--@arg        lease_ms        int:1..31536000000  Each lease lasts until the server's now + lease_ms.
--@arg        wait_ms         int:0..31536000000  If nothing is taken: how long the caller will block (0: it will not).
--@arg        ack_task_id     string:0..1024  A leased task to ack first ("": none).
--@arg        ack_token       int:0..9007199254740991  The fencing token of that lease (0 with no ack).
--@arg        request_id      string:0..64  Idempotency key of this call, [0-9A-Za-z_-] ("": none); also part of the request key name.
--@arg        request_ttl_ms  int:1..86400000  How long the record of request_id is kept.
--@reply      array{next_due_ms:int, lease...}  Then 5 entries per taken task, best first: task_id:string,
--@+          payload:string, attempt:int (1 = first lease), token:int (fencing token), deadline_ms:int (server ms).
--@+          next_due_ms: 0 when tasks were taken (or replayed); otherwise, with wait_ms > 0, ms until the next
--@+          delayed task is due (-1: none delayed), and -1 with wait_ms = 0.
--@error      ARG  Not 8 keys or 8 arguments, an argument out of its range, ack_task_id without ack_token (or the
--@+          reverse), or a request id used by another call.
--@error      STALE  The lease to ack is no longer held (finished, or expired and taken again: another token); nothing changed.
--@error      GROUPED  The queue has groups (queue.group_enqueue, set_group or set_limits was called): take from it
--@+          with queue.group_dequeue; nothing changed.
--@error      CORRUPT  A key of the queue holds another type or shape than the layout; nothing changed.
--@complexity O((count + 32) log n) for n tasks in the queue; O(log n) when nothing is due or expired
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
    local prefix, tail_queue = string.match(first, '^(luasched:{[^{}]+}:)q:ready:(.*)$')
    if not prefix then
      if not string.find(first, '^luasched:{[^{}]+}:') then
        return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[1] must start with luasched:{<namespace>}: (a namespace of at least one byte, without { or })')
      end
      return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[1] must be luasched:{ns}:q:ready:<queue> in the namespace of KEYS[1]')
    end
    local plen = #prefix
    local key
    key = keys[2]
    if key and key ~= prefix .. 'q:delayed:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[2] must be luasched:{ns}:q:delayed:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[3]
    if key and key ~= prefix .. 'q:leased:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[3] must be luasched:{ns}:q:leased:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[4]
    if key and key ~= prefix .. 'q:dead:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[4] must be luasched:{ns}:q:dead:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[5]
    if key and key ~= prefix .. 'q:tasks:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[5] must be luasched:{ns}:q:tasks:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[6]
    if key and key ~= prefix .. 'q:wake:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[6] must be luasched:{ns}:q:wake:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[7]
    if key and key ~= prefix .. 'q:waiting:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[7] must be luasched:{ns}:q:waiting:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[8]
    if key and (sub(key, 1, plen) ~= prefix or sub(key, plen + 1, plen + 6) ~= 'q:req:') then
      return redis.error_reply('LUASCHED_ARG queue.dequeue: KEYS[8] must be luasched:{ns}:q:req:<request_id>:<queue> in the namespace of KEYS[1]')
    end
  end
end
-- The lean path: the common take (nothing due in delayed, no expired lease in leased, ready tasks
-- present, no request record yet), with or without the ack of one lease first: the calls the
-- wrapper makes for dequeue, dequeue_many and ack_and_dequeue. It runs before the helpers below
-- are defined (defining them costs about as much as the take). Its checks accept only arguments
-- main() accepts too (canonical decimals: no leading zeros, short enough to be exact); anything
-- else, a recorded request id (a replay), anything due or expired, nothing to take, an acked
-- lease that is not held, a malformed meta/seq/fence or a key of another type (redis.pcall: an
-- error table, not a raise) goes on to main(), with FAST_NOW_MS/US (TIME is read once per call) and
-- nothing written. With no task moved into ready, the head of ready is exactly what main() takes
-- (no candidates to sort, no waiter to wake: every candidate is taken), so it writes what main()
-- writes: ZREM ready, the ack's ZREM leased + HDEL, ZADD leased (deadlines), one HSET of the
-- metas (format_meta's format) + seq + fence, the request record; and answers main()'s reply.
-- Numbers go to redis.call as numbers (integers below 2^53: redis formats them exactly, and
-- cheaper than Lua's own "%.14g" concatenation), so it writes what main() writes.
local FAST_NOW_MS, FAST_NOW_US = nil, nil
if #KEYS == 8 and #ARGV == 8 then
  repeat
    local worker_id, count_raw, lease_raw, wait_raw = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
    local ack_task_id, ack_token_raw, request_id, request_ttl_raw = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
    local acking = ack_task_id ~= ''
    -- Canonical decimals, their bounds by length (a tonumber only at a bound's own length):
    -- count 1..1000, lease_ms and wait_ms of at most 10 digits (bound 31536000000: no
    -- comparison needed), request_ttl_ms 1..86400000, ack_token 1..2^53 - 1 with an ack, else "0".
    if #worker_id > 256 or #ack_task_id > 1024 or #request_id > 64
      or #count_raw > 4 or #lease_raw > 10 or #wait_raw > 10 or #request_ttl_raw > 8
      or not string.find(count_raw .. ' ' .. lease_raw .. ' ' .. request_ttl_raw, '^[1-9]%d* [1-9]%d* [1-9]%d*$')
      or (#count_raw == 4 and tonumber(count_raw) > 1000)
      or (#request_ttl_raw == 8 and tonumber(request_ttl_raw) > 86400000)
      or (wait_raw ~= '0' and not string.find(wait_raw, '^[1-9]%d*$'))
      or (request_id ~= '' and not string.find(request_id, '^[%w_%-]*$')) then
      break
    end
    if acking then
      if #ack_token_raw > 16 or not string.find(ack_token_raw, '^[1-9]%d*$')
        or (#ack_token_raw == 16 and tonumber(ack_token_raw) > 9007199254740991) then
        break
      end
    elseif ack_token_raw ~= '0' then
      break
    end
    local time = redis.call('TIME')
    -- server_now_ms() of the prelude, by string arithmetic (cheaper than tonumber, same value).
    local micros = time[2] + 0
    local now_ms = time[1] * 1000 + (micros - micros % 1000) / 1000
    local now_us = (time[1] * 1000000 + time[2])
    FAST_NOW_MS, FAST_NOW_US = now_ms, now_us
    -- No request record (false: no key; a string is a replay, an error table a key of another type).
    if request_id ~= '' and redis.pcall('GET', KEYS[8]) ~= false then
      break
    end
    -- Nothing due, nothing expired: ZCOUNT answers 0 (an error table is no 0 either).
    if redis.pcall('ZCOUNT', KEYS[2], '-inf', now_ms) ~= 0 or redis.pcall('ZCOUNT', KEYS[3], '-inf', now_ms) ~= 0 then
      break
    end
    local head = redis.pcall('ZRANGE', KEYS[1], '0', count_raw == '1' and '0' or count_raw - 1)
    local taken = #head -- 0 for an error table too
    if taken == 0 then
      break
    end
    -- seq, fence, then payload and meta of each task, then the acked task's meta.
    local values, fields
    if taken == 1 then
      local task_id = head[1]
      if acking then
        values = redis.pcall('HMGET', KEYS[5], 'seq', 'fence', 'p' .. task_id, 'm' .. task_id, 'm' .. ack_task_id, 'G')
      else
        values = redis.pcall('HMGET', KEYS[5], 'seq', 'fence', 'p' .. task_id, 'm' .. task_id, 'G')
      end
    else
      fields = { 'seq', 'fence' }
      for index = 1, taken do
        local task_id = head[index]
        fields[2 * index + 1] = 'p' .. task_id
        fields[2 * index + 2] = 'm' .. task_id
      end
      if acking then
        fields[2 * taken + 3] = 'm' .. ack_task_id
      end
      fields[#fields + 1] = 'G'
      values = redis.pcall('HMGET', KEYS[5], unpack(fields))
    end
    -- A queue with groups ("G", the last field) goes to main(), which answers GROUPED.
    if values.err or values[2 * taken + (acking and 4 or 3)] then
      break
    end
    -- seq is written back as it is (canonical: what main() writes), within its 43 bits;
    -- fence (main(): any digits) becomes `before`, the last token before this call's: the
    -- tokens are before + 1 .. before + taken (main(): first_token), below 2^53.
    local seq, fence = values[1], values[2]
    if seq == false then
      seq = '0'
    elseif #seq > 13 or not string.find(seq, '^[1-9]%d*$') or (#seq == 13 and tonumber(seq) > 8796093022207) then
      break
    end
    if fence == false then
      fence = 0
    elseif #fence > 16 or not string.find(fence, '^%d+$') then
      break
    else
      fence = fence + 0
    end
    fence = (fence < now_us and now_us or fence + 1) - 1
    if fence + taken > 9007199254740991 then
      break
    end
    -- The acked lease is held: leased (L) under ack_token (compared as canonical text); anything
    -- else (main() compares numbers) goes on to main(), which answers STALE or acks.
    if acking then
      local raw = values[2 * taken + 3]
      if not raw or string.match(raw, '^L %-?%d+ %d+ %d+ (%d+) %d+ ') ~= ack_token_raw then
        break
      end
    end
    local deadline_ms = now_ms + lease_raw
    local acked = acking and 1 or 0
    -- The new meta: main()'s format_meta (string.format converts the captured digits as
    -- tonumber does, and so does the arithmetic of attempts + 1).
    if taken == 1 then
      local task_id, raw = head[1], values[4]
      local priority, max_attempts, attempts -- (not `raw and match()`: one value)
      if raw then
        priority, max_attempts, attempts = string.match(raw, '^[RDLX] (%-?%d+) (%d+) (%d+) %d+ %d+ ')
      end
      if not priority then
        break
      end
      attempts = attempts + 1
      local token = fence + 1
      local meta = string.format('L %d %d %d %d %d ', priority, max_attempts, attempts, token, deadline_ms) .. worker_id
      -- Writes, in main()'s order; every key was read above, so none can fail on its type.
      redis.call('ZREM', KEYS[1], task_id)
      if acking then
        redis.call('ZREM', KEYS[3], ack_task_id)
        redis.call('HDEL', KEYS[5], 'p' .. ack_task_id, 'm' .. ack_task_id, 'r' .. ack_task_id)
      end
      redis.call('ZADD', KEYS[3], deadline_ms, task_id)
      redis.call('HSET', KEYS[5], 'm' .. task_id, meta, 'seq', seq, 'fence', token)
      if request_id ~= '' then
        redis.call('SET', KEYS[8], cmsgpack.pack({ 'dequeue', acked, task_id, token }), 'PX', request_ttl_raw)
      end
      return { 0, task_id, values[3], attempts, token, deadline_ms }
    end
    -- Each meta is format_meta's output in two parts: the tail (deadline and worker id, appended
    -- with `..` as format_meta does) is the same for all.
    local tail = string.format(' %d ', deadline_ms) .. worker_id
    local leased_args, meta_args, reply, entry = {}, {}, { 0 }, { 'dequeue', acked }
    local malformed = false
    for index = 1, taken do
      local task_id, raw = head[index], values[2 * index + 2]
      local priority, max_attempts, attempts -- (not `raw and match()`: one value)
      if raw then
        priority, max_attempts, attempts = string.match(raw, '^[RDLX] (%-?%d+) (%d+) (%d+) %d+ %d+ ')
      end
      if not priority then
        malformed = true
        break
      end
      attempts = attempts + 1
      local token = fence + index
      leased_args[2 * index - 1] = deadline_ms
      leased_args[2 * index] = task_id
      meta_args[2 * index - 1] = fields[2 * index + 2] -- 'm' .. task_id
      meta_args[2 * index] = string.format('L %d %d %d %d', priority, max_attempts, attempts, token) .. tail
      local size = 5 * index - 4
      reply[size + 1] = task_id
      reply[size + 2] = values[2 * index + 1]
      reply[size + 3] = attempts
      reply[size + 4] = token
      reply[size + 5] = deadline_ms
      entry[2 * index + 1] = task_id
      entry[2 * index + 2] = token
    end
    if malformed then
      break
    end
    meta_args[2 * taken + 1] = 'seq'
    meta_args[2 * taken + 2] = seq
    meta_args[2 * taken + 3] = 'fence'
    meta_args[2 * taken + 4] = fence + taken
    -- Writes, in main()'s order (as above).
    redis.call('ZREM', KEYS[1], unpack(head))
    if acking then
      redis.call('ZREM', KEYS[3], ack_task_id)
      redis.call('HDEL', KEYS[5], 'p' .. ack_task_id, 'm' .. ack_task_id, 'r' .. ack_task_id)
    end
    redis.call('ZADD', KEYS[3], unpack(leased_args))
    redis.call('HSET', KEYS[5], unpack(meta_args))
    if request_id ~= '' then
      redis.call('SET', KEYS[8], cmsgpack.pack(entry), 'PX', request_ttl_raw)
    end
    return reply
  until true
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
local SCRIPT_NAME = 'queue.dequeue'
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
-- nothing was written yet. Any other error (OOM, NOPERM...) propagates unchanged. Every script
-- that takes KEYS gets that conversion and declares CORRUPT (render.py refuses a header without).
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

-- A stored unsigned integer (seq, fence): absent (nil/false) gives nil, anything but plain
-- decimal digits is CORRUPT.
local function stored_uint_or_nil(raw, what)
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

-- The meta of a task that must exist (it is a member of one of the zsets).
local function existing_meta(raw, task_id)
  if not raw then
    fail('CORRUPT', 'task ' .. show(task_id) .. ' is queued but has no meta')
  end
  return parse_meta(raw, task_id)
end

-- One string.format call (cheaper than a decimal() per field); %d is a 64-bit integer here.
-- (The worker id is appended with `..`: Lua 5.1's '%s' would cut one below 100 bytes at a NUL.)
local function format_meta(meta)
  return string.format('%s %d %d %d %d %d ', meta.state, meta.priority, meta.max_attempts,
    meta.attempts, meta.token, meta.at_ms) .. meta.worker
end

-- The score of a ready task (see the budget above; limits.ready_score is its one spelling).
local function ready_score(priority, seq)
  return (511 - priority) * 8796093022208 + seq
end

-- Fails unless `seq` (the last sequence number after this call) fits its 43 bits.
local function check_seq(seq)
  if seq > MAX_SEQ then
    fail('CORRUPT', 'the sequence of the queue is exhausted (2^43 - 1)')
  end
end

-- The record of `request_id` for operation `op` (a msgpack list {op, ...}), or nil (none, or no
-- request id).
local function recorded_request(request_id, op)
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

-- Records `record` (a list, record[1] = op; msgpack) for `request_id` (a write: SET cannot fail).
local function record_request(request_id, ttl_ms, record)
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

-- ---------------------------------------------------------------------------------------------
-- wake (lua/include/wake.lua.j2): the wake-up signals of blocked callers (a LIST they BLPOP),
-- one rule for every area. Included by queue.lua.j2 and lock.lua.j2, which bind WAKE_MAX (most
-- signals kept) and WAKE_TTL_MS (the list expires that long after a push) from their limits.
-- ---------------------------------------------------------------------------------------------

-- Pushes `count` (1..) wake-up signals `signal` (absent: "1"; at most WAKE_MAX) on the list
-- `wake`, keeps its newest WAKE_MAX and lets it expire WAKE_TTL_MS later. Cannot fail once the
-- caller read the list's type (before its first write).
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
-- A dequeue that took nothing: with wait_ms > 0 it registers the caller on the waiting marker
-- `waiting` (PX wait_ms, only ever lengthened; nil: no marker to set) and answers the ms until
-- the next delayed task is due (-1: none); with wait_ms = 0 it answers -1. PTTL and SET cannot
-- fail (any type), and K_DELAYED was read before, so this may follow the writes.
local function nothing_taken(now_ms, wait_ms, waiting)
  if wait_ms == 0 then
    return { -1 }
  end
  local next_due = read('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  if waiting and redis.call('PTTL', waiting) < wait_ms then
    redis.call('SET', waiting, '1', 'PX', wait_ms)
  end
  if not next_due[1] then
    return { -1 }
  end
  return { math.max(1, tonumber(next_due[2]) - now_ms) }
end

-- The reply of a replayed dequeue: the leases of `record` ({op, acked, task_id, token, ...})
-- that are still held under their token, as {0, task_id, payload, attempt, token, deadline}...
local function replay_leases(record)
  local fields = {}
  for position = 3, #record, 2 do
    local task_id = record[position]
    fields[#fields + 1] = 'p' .. task_id
    fields[#fields + 1] = 'm' .. task_id
  end
  local reply = { 0 }
  if #fields == 0 then
    return reply
  end
  local values = read('HMGET', K_TASKS, unpack(fields))
  for position = 3, #record, 2 do
    local offset = position - 2
    local raw_meta = values[offset + 1]
    if raw_meta then
      local meta = parse_meta(raw_meta, record[position])
      if meta.state == 'L' and meta.token == record[position + 1] then
        local count = #reply
        reply[count + 1] = record[position]
        reply[count + 2] = values[offset]
        reply[count + 3] = meta.attempts
        reply[count + 4] = meta.token
        reply[count + 5] = meta.at_ms
      end
    end
  end
  return reply
end
local function main()
  key_count(QUEUE_KEY_COUNT)
  arg_count(8, 8)
  local worker_id = arg_string(1, 'worker_id', 0, 256)
  local count = arg_int(2, 'count', 1, 1000)
  local lease_ms = arg_int(3, 'lease_ms', 1, MAX_TTL_MS)
  local wait_ms = arg_int(4, 'wait_ms', 0, MAX_TTL_MS)
  local ack_task_id = arg_string(5, 'ack_task_id', 0, MAX_TASK_ID_BYTES)
  local ack_token = arg_int(6, 'ack_token', 0, MAX_SAFE_INTEGER)
  local request_id = arg_request_id(7)
  local request_ttl_ms = arg_int(8, 'request_ttl_ms', 1, MAX_REQUEST_TTL_MS)
  local acking = ack_task_id ~= ''
  if acking ~= (ack_token > 0) then
    fail('ARG', 'ack_task_id and ack_token come together (both empty/0, or both set)')
  end
  local now_ms, now_us = FAST_NOW_MS, FAST_NOW_US
  if not now_ms then
    now_ms, now_us = server_now_ms()
  end
  local record = recorded_request(request_id, 'dequeue')
  if record then
    return replay_leases(record)
  end
  if read('HGET', K_TASKS, 'G') then
    fail('GROUPED', 'the queue has groups: take from it with queue.group_dequeue')
  end

  -- Reads, which also check every written key's type. Bounded: LIMIT on both sweeps.
  local now = decimal(now_ms)
  local due = read('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, 16)
  local expired = read('ZRANGEBYSCORE', K_LEASED, '-inf', now, 'LIMIT', 0, 16)
  local head = read('ZRANGE', K_READY, 0, count - 1, 'WITHSCORES')
  if #head == 0 and #due == 0 and #expired == 0 and not acking then
    return nothing_taken(now_ms, wait_ms, K_WAITING)
  end

  -- One HMGET for everything: seq, fence, the acked task's meta, and payload + meta of every
  -- task that may be taken or moved.
  local fields = { 'seq', 'fence', 'm' .. ack_task_id }
  local moving = {}
  for _, task_id in ipairs(due) do
    moving[#moving + 1] = task_id
  end
  for _, task_id in ipairs(expired) do
    -- A lease that is acked in this call is not reclaimed.
    if not (acking and task_id == ack_task_id) then
      moving[#moving + 1] = task_id
    end
  end
  local head_count = #head / 2
  for position = 1, #head, 2 do
    fields[#fields + 1] = 'p' .. head[position]
    fields[#fields + 1] = 'm' .. head[position]
  end
  for _, task_id in ipairs(moving) do
    fields[#fields + 1] = 'p' .. task_id
    fields[#fields + 1] = 'm' .. task_id
  end
  local values = read('HMGET', K_TASKS, unpack(fields))
  local seq = stored_uint_or_nil(values[1], 'the seq field') or 0
  local fence = stored_uint_or_nil(values[2], 'the fence field') or 0

  if acking then
    local raw = values[3]
    local meta = raw and parse_meta(raw, ack_task_id)
    if not meta or meta.state ~= 'L' or meta.token ~= ack_token then
      fail('STALE', 'the lease of task ' .. show(ack_task_id) .. ' with token ' .. decimal(ack_token)
        .. ' is no longer held')
    end
  end

  -- Candidates: the head of ready, and the tasks that become ready now (fresh seq numbers).
  local candidates = {}
  for index = 1, head_count do
    local task_id = head[2 * index - 1]
    candidates[index] = {
      id = task_id,
      score = tonumber(head[2 * index]),
      payload = values[2 + 2 * index],
      meta = existing_meta(values[3 + 2 * index], task_id),
      from_ready = true,
    }
  end
  local died = {}
  local due_count = #due
  for index, task_id in ipairs(moving) do
    local offset = 2 + 2 * (head_count + index)
    local meta = existing_meta(values[offset + 1], task_id)
    local from_delayed = index <= due_count
    if from_delayed or meta.attempts < meta.max_attempts then
      seq = seq + 1
      candidates[#candidates + 1] = {
        id = task_id,
        score = ready_score(meta.priority, seq),
        payload = values[offset],
        meta = meta,
        from_delayed = from_delayed,
      }
    else
      died[#died + 1] = { id = task_id, meta = meta }
    end
  end
  check_seq(seq)
  if #moving > 0 then
    table.sort(candidates, function(a, b) return a.score < b.score end)
  end
  local taken = math.min(count, #candidates)
  if taken > 0 then
    -- The tokens are fence + 1 .. fence + taken (the loop below counts them up).
    fence = first_token(fence, now_us, taken, 'the fence field') - 1
  end
  if #died > 0 then
    read('ZCARD', K_DEAD)
  end
  local woken = #candidates - taken
  local waiting = woken > 0 and waiters_present(K_WAITING, K_WAKE)

  -- Writes. The first one goes through first_write; every key below was read above.
  local wrote = false
  local function write(...)
    if wrote then
      return redis.call(...)
    end
    wrote = true
    return first_write(...)
  end
  local taken_ready, removed_leased, delayed_out = {}, {}, {}
  local leased_args, ready_args, dead_args, meta_args = {}, {}, {}, {}
  if acking then
    removed_leased[1] = ack_task_id
  end
  local reply = { 0 }
  for index = 1, taken do
    local candidate = candidates[index]
    local meta = candidate.meta
    fence = fence + 1
    meta.attempts = meta.attempts + 1
    meta.token = fence
    meta.state = 'L'
    meta.at_ms = now_ms + lease_ms
    meta.worker = worker_id
    if candidate.from_ready then
      taken_ready[#taken_ready + 1] = candidate.id
    end
    leased_args[#leased_args + 1] = meta.at_ms
    leased_args[#leased_args + 1] = candidate.id
    meta_args[#meta_args + 1] = 'm' .. candidate.id
    meta_args[#meta_args + 1] = format_meta(meta)
    local size = #reply
    reply[size + 1] = candidate.id
    reply[size + 2] = candidate.payload
    reply[size + 3] = meta.attempts
    reply[size + 4] = fence
    reply[size + 5] = meta.at_ms
  end
  for index = taken + 1, #candidates do
    local candidate = candidates[index]
    if not candidate.from_ready then
      candidate.meta.state = 'R'
      candidate.meta.at_ms = now_ms
      ready_args[#ready_args + 1] = candidate.score
      ready_args[#ready_args + 1] = candidate.id
      meta_args[#meta_args + 1] = 'm' .. candidate.id
      meta_args[#meta_args + 1] = format_meta(candidate.meta)
    end
  end
  for index = 1, #moving do
    if index <= due_count then
      delayed_out[#delayed_out + 1] = moving[index]
    else
      removed_leased[#removed_leased + 1] = moving[index]
    end
  end
  for _, entry in ipairs(died) do
    entry.meta.state = 'X'
    entry.meta.at_ms = now_ms
    dead_args[#dead_args + 1] = now
    dead_args[#dead_args + 1] = entry.id
    meta_args[#meta_args + 1] = 'm' .. entry.id
    meta_args[#meta_args + 1] = format_meta(entry.meta)
    meta_args[#meta_args + 1] = 'r' .. entry.id
    meta_args[#meta_args + 1] = 'lease expired'
  end

  if #taken_ready > 0 then
    write('ZREM', K_READY, unpack(taken_ready))
  end
  if #delayed_out > 0 then
    write('ZREM', K_DELAYED, unpack(delayed_out))
  end
  if #removed_leased > 0 then
    write('ZREM', K_LEASED, unpack(removed_leased))
  end
  if acking then
    write('HDEL', K_TASKS, 'p' .. ack_task_id, 'm' .. ack_task_id, 'r' .. ack_task_id)
  end
  if #leased_args > 0 then
    write('ZADD', K_LEASED, unpack(leased_args))
  end
  if #ready_args > 0 then
    write('ZADD', K_READY, unpack(ready_args))
  end
  if #dead_args > 0 then
    write('ZADD', K_DEAD, unpack(dead_args))
  end
  meta_args[#meta_args + 1] = 'seq'
  meta_args[#meta_args + 1] = seq
  meta_args[#meta_args + 1] = 'fence'
  meta_args[#meta_args + 1] = fence
  write('HSET', K_TASKS, unpack(meta_args))
  if waiting then
    push_wake(K_WAKE, woken)
  end

  if taken == 0 then
    reply = nothing_taken(now_ms, wait_ms, K_WAITING)
  end
  if acking or taken > 0 then
    local entry = { 'dequeue', acking and 1 or 0 }
    for index = 1, taken do
      entry[#entry + 1] = reply[5 * index - 3]
      entry[#entry + 1] = reply[5 * index]
    end
    record_request(request_id, request_ttl_ms, entry)
  end
  return reply
end

return run(main)
