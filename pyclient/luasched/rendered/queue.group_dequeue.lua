--@script     queue.group_dequeue
--@summary    queue.dequeue for a queue with groups: takes up to `count` ready tasks, picking the group of each
--@+          take fairly, and leases them, in one atomic step; optionally acks one lease first. The next take is
--@+          from the eligible group (a ready task, not paused, fewer leases held than its cap) with the lowest pass;
--@+          a take adds 1/weight to its group's pass: round robin with equal weights, shares proportional to the
--@+          weights otherwise. Tasks without a group form one more group (""), weight 1, no cap. Within a group:
--@+          highest priority first, FIFO within a priority. Nothing is taken while the queue is paused or holds
--@+          its cap of leases. Rate limits (queue.set_rate, GCRA on the server clock) are checked in the same step: a
--@+          group its rate holds back waits in gwait, the queue's rate bounds every take. Like queue.dequeue it first promotes up to 16 due delayed tasks and reclaims
--@+          up to 16 expired leases (each keeps its group; a reclaimed lease frees a place under its group's cap),
--@+          and answers, records and replays exactly as queue.dequeue does; its lease tokens follow queue.dequeue's rule
--@+          (the first max(last token of the queue + 1, the server's clock in us), then one by one).
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
--@key        gready    zset    luasched:{ns}:q:gready:<queue> -- ready tasks of groups, all scored 0, each member
--@+          "<3-digit byte length of the group><group><ready score as 14 lowercase hex digits><task_id>": ZRANGEBYLEX by
--@+          the group's prefix gives its head (priority, then FIFO), O(log n).
--@key        gring     zset    luasched:{ns}:q:gring:<queue> -- the groups a dequeue may take from now (a ready task,
--@+          not paused, under its cap, allowed by its rate), scored by their pass (virtual time); "" stands for the tasks without a group
--@+          (in the ready key). Lowest pass first; a take adds 1/weight to the group's pass.
--@key        groups    hash    luasched:{ns}:q:groups:<queue> -- the settings (it exists only once one was made): per
--@+          group g: "w"..g weight, "c"..g max_active (0: none), "s"..g "1" while paused, "r"..g its rate limit as ms per
--@+          take (absent: none), "b"..g its burst, "t"..g its GCRA theoretical arrival time (server ms); per queue: "C"
--@+          max_active of the whole queue (0: none), "S" "1" while paused, "R", "B", "T" the queue's rate limit, burst and
--@+          theoretical arrival time. What every take changes is in the tasks hash: "a"..g the leases held of group g,
--@+          "v"..g its pass while out of the ring, "V" the pass of the last take.
--@key        gwait     zset    luasched:{ns}:q:gwait:<queue> -- groups out of the ring only because of their rate
--@+          limit, scored by the server ms at which they may take again; a dequeue puts the due ones back.
--@arg        worker_id       string:0..256  Who takes the tasks (stored with the lease, for humans).
--@arg        count           int:1..1000  Most tasks to take.
--@arg        lease_ms        int:1..31536000000  Each lease lasts until the server's now + lease_ms.
--@arg        wait_ms         int:0..31536000000  If nothing is taken: how long the caller will block (0: it will not).
--@arg        ack_task_id     string:0..1024  A leased task to ack first ("": none).
--@arg        ack_token       int:0..9007199254740991  The fencing token of that lease (0 with no ack).
--@arg        request_id      string:0..64  Idempotency key of this call, [0-9A-Za-z_-] ("": none); also part of the request key name.
--@arg        request_ttl_ms  int:1..86400000  How long the record of request_id is kept.
--@reply      array{next_due_ms:int, lease...}  As queue.dequeue: then 5 entries per taken task, in the order taken:
--@+          task_id:string, payload:string, attempt:int, token:int, deadline_ms:int (server ms). next_due_ms: 0 when
--@+          tasks were taken (or replayed); otherwise, with wait_ms > 0, ms until the next delayed task is due (-1:
--@+          none delayed), and -1 with wait_ms = 0; when a rate limit held a take back, at most the ms until it allows
--@+          one (whatever wait_ms).
--@error      ARG  Not 12 keys or 8 arguments, an argument out of its range, ack_task_id without ack_token (or the
--@+          reverse), or a request id used by another call.
--@error      STALE  The lease to ack is no longer held; nothing changed.
--@error      CORRUPT  A key of the queue holds another type or shape than the layout; nothing changed.
--@complexity O((count + 32) (log n + log g) + count * k) for n tasks, g groups in the ring and k = count + 34 groups considered; never a scan of groups or tasks
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
        return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[1] must start with luasched:{<namespace>}: (a namespace of at least one byte, without { or })')
      end
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[1] must be luasched:{ns}:q:ready:<queue> in the namespace of KEYS[1]')
    end
    local plen = #prefix
    local key
    key = keys[2]
    if key and key ~= prefix .. 'q:delayed:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[2] must be luasched:{ns}:q:delayed:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[3]
    if key and key ~= prefix .. 'q:leased:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[3] must be luasched:{ns}:q:leased:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[4]
    if key and key ~= prefix .. 'q:dead:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[4] must be luasched:{ns}:q:dead:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[5]
    if key and key ~= prefix .. 'q:tasks:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[5] must be luasched:{ns}:q:tasks:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[6]
    if key and key ~= prefix .. 'q:wake:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[6] must be luasched:{ns}:q:wake:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[7]
    if key and key ~= prefix .. 'q:waiting:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[7] must be luasched:{ns}:q:waiting:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[8]
    if key and (sub(key, 1, plen) ~= prefix or sub(key, plen + 1, plen + 6) ~= 'q:req:') then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[8] must be luasched:{ns}:q:req:<request_id>:<queue> in the namespace of KEYS[1]')
    end
    key = keys[9]
    if key and key ~= prefix .. 'q:gready:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[9] must be luasched:{ns}:q:gready:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[10]
    if key and key ~= prefix .. 'q:gring:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[10] must be luasched:{ns}:q:gring:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[11]
    if key and key ~= prefix .. 'q:groups:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[11] must be luasched:{ns}:q:groups:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[12]
    if key and key ~= prefix .. 'q:gwait:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.group_dequeue: KEYS[12] must be luasched:{ns}:q:gwait:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
  end
end
-- The lean path: the common grouped take, dequeue(): one task, no ack, no request record yet,
-- nothing due in delayed, no expired lease, no group due back from its rate (gwait), and the
-- first group of the ring (not "") with no setting that asks for more than a count: the queue
-- not paused, without a cap or a rate; the group not paused, without a rate, under its cap if it
-- has one; tasks without a group (ready) only while "" is in the ring (behind the first group, so
-- not taken now). It runs before the helpers below are defined. Its calls in the common case:
-- TIME, 2 ZCOUNT (delayed, leased), one EXISTS of the request record, gwait, ready and the
-- groups hash (none exists: no record, nothing waiting for a rate, no task without a group, no
-- setting; if one does, each is read as main() reads it), ZRANGE of the ring's first group,
-- ZRANGEBYLEX of its head and the task after it, one HMGET of the tasks hash (seq, fence, the
-- task's payload and meta, the group's lease count "a"), then the writes. Its checks accept only
-- what main() accepts too (include/dequeue_lean.lua.j2; settings in their canonical form);
-- anything else (a replay, something due, count > 1, an ack, a setting, a malformed head, meta,
-- seq or fence, a key of another type: redis.pcall gives an error table) goes on to main(), with
-- FAST_NOW_MS/US and nothing written. Then main() takes the head of that group too (the ring's
-- first group is the one with the lowest (pass, name), and no other group gains a ready task or
-- a lease in this call), so it writes what main() writes: ZREM gready, ZADD leased, one HSET of
-- the tasks hash with the meta, seq, fence, the group's lease count and the queue's pass "V"
-- (main() writes the last two one by one, to the same values), the group's new pass in the ring
-- (or, with no ready task left or at its cap, out of it with its pass kept in "v"), the request
-- record; and answers main()'s reply. Passes are computed as main() computes them (the ring's
-- score, plus 1 / weight) and go to redis.call as numbers, as in main().
-- What it leaves to the invariants instead of reading (as group_ack's lean path does for the
-- shapes of settings it does not use; no script writes them otherwise): the shape of "V" (it is
-- only written, as main() writes it), that a group in the ring has no kept pass "v" (settle() and
-- this path remove or write it as the group joins or leaves; main() would HDEL one, and a group
-- in the ring takes its pass from the ring either way), and the shape of the group's second
-- ready member (only its presence is used; it is checked when it becomes the head).
local FAST_NOW_MS, FAST_NOW_US = nil, nil
if #KEYS == 12 and #ARGV == 8 then
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
    -- Nothing due, nothing expired: ZCOUNT answers 0 (an error table is no 0 either).
    if redis.pcall('ZCOUNT', KEYS[2], '-inf', now_ms) ~= 0 or redis.pcall('ZCOUNT', KEYS[3], '-inf', now_ms) ~= 0 then
      break
    end
    if count_raw ~= '1' or acking then
      break
    end
    -- One EXISTS answers four probes in the common case (an empty key does not exist): no
    -- request record (with a request id), no group waiting for its rate (gwait), no task without
    -- a group (ready), no setting (the groups hash holds settings only: it exists once one was
    -- made). If one of them exists, each is checked as if none had been probed.
    local present
    if request_id ~= '' then
      present = redis.pcall('EXISTS', KEYS[8], KEYS[12], KEYS[1], KEYS[11])
    else
      present = redis.pcall('EXISTS', KEYS[12], KEYS[1], KEYS[11])
    end
    local others = present ~= 0
    if others then
      -- No request record (false: no key; a string is a replay, an error table a key of another
      -- type), no group due back from its rate.
      if (request_id ~= '' and redis.pcall('GET', KEYS[8]) ~= false) or redis.pcall('ZCOUNT', KEYS[12], '-inf', now_ms) ~= 0 then
        break
      end
      -- Tasks without a group: "" must be in the ring (main() would let it join, maybe first).
      local plain_ready = redis.pcall('ZCARD', KEYS[1])
      if plain_ready ~= 0 and (type(plain_ready) ~= 'number' or redis.pcall('ZSCORE', KEYS[10], '') == false) then
        break
      end
    end
    -- The ring's first group and its pass (a finite number, as stored_pass() reads it; a score
    -- ZRANGE answers is always a number's text, so `+ 0` reads it as tonumber() does).
    local top = redis.pcall('ZRANGE', KEYS[10], '0', '0', 'WITHSCORES')
    local group = top[1] -- nil for an error table too
    if not group or group == '' then
      break
    end
    local pass = top[2] + 0
    if pass - pass ~= 0 then -- nan or an infinity
      break
    end
    -- The group's head and the task after it (group_member(): 3-digit length, the group, the
    -- ready score in 14 hex digits, then a task id of at least one byte).
    local prefix = string.format('%03d', #group) .. group
    local heads = redis.pcall('ZRANGEBYLEX', KEYS[9], '[' .. prefix, '(' .. prefix .. '\255', 'LIMIT', '0', '2')
    local at = #prefix + 1
    local task_id = heads[1] and string.match(heads[1], '^%x%x%x%x%x%x%x%x%x%x%x%x%x%x(.+)$', at) -- (nil for an error table too)
    if not task_id then
      break
    end
    local meta_field, active_field = 'm' .. task_id, 'a' .. group
    local values = redis.pcall('HMGET', KEYS[5], 'seq', 'fence', 'p' .. task_id, meta_field, active_field)
    -- The group's lease count "a" canonical or absent.
    if values.err or not values[3] then
      break
    end
    local weight, cap, active = 1, 0, 0
    local active_raw = values[5]
    if active_raw then
      active = #active_raw <= 15 and string.find(active_raw, '^[1-9]%d*$') and active_raw + 0
      if not active then
        break
      end
    end
    -- With a groups hash (or a key of another type there: an error table), read_groups()'s
    -- settings: no pause, no cap ("0" is none) and no rate of the queue (S, C, R); the group's w
    -- (1..1000) and c (0..1000000) canonical or absent, s not "1", no rate (r). (A burst and a rate
    -- time, B/T and b/t, exist only beside their rate: queue.set_rate writes and removes the
    -- three together.)
    if others then
      local settings = redis.pcall('HMGET', KEYS[11], 'w' .. group, 'c' .. group, 's' .. group, 'r' .. group, 'S', 'C', 'R')
      if settings.err or settings[3] == '1' or settings[4] or settings[5] == '1' or (settings[6] and settings[6] ~= '0') or settings[7] then
        break
      end
      local weight_raw, cap_raw = settings[1], settings[2]
      if weight_raw then
        weight = #weight_raw <= 4 and string.find(weight_raw, '^[1-9]%d*$') and weight_raw + 0
        if not weight or weight > 1000 then
          break
        end
      end
      if cap_raw then
        cap = #cap_raw <= 7 and string.find(cap_raw, '^%d+$') and (cap_raw == '0' or string.find(cap_raw, '^[1-9]')) and cap_raw + 0
        if not cap or cap > 1000000 then
          break
        end
      end
      if cap > 0 and active >= cap then
        break
      end
    end
    local taken = 1
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
    local token = fence + 1
    local raw = values[4]
    local priority, max_attempts, attempts -- (not `raw and match()`: one value)
    if raw then
      priority, max_attempts, attempts = string.match(raw, '^[RDLX] (%-?%d+) (%d+) (%d+) %d+ %d+ ')
    end
    if not priority then
      break
    end
    attempts = attempts + 1
    local deadline_ms = now_ms + lease_raw
    local meta = string.format('L %d %d %d %d %d ', priority, max_attempts, attempts, token, deadline_ms) .. worker_id
    local group_pass = pass + 1 / weight
    -- Writes, as main() makes them; every key was read above, so none can fail on its type.
    redis.call('ZREM', KEYS[9], heads[1])
    redis.call('ZADD', KEYS[3], deadline_ms, task_id)
    if heads[2] and (cap == 0 or active + 1 < cap) then
      redis.call('HSET', KEYS[5], meta_field, meta, 'seq', seq, 'fence', token, active_field, active + 1, 'V', pass)
      redis.call('ZADD', KEYS[10], group_pass, group)
    else
      redis.call('HSET', KEYS[5], meta_field, meta, 'seq', seq, 'fence', token, active_field, active + 1, 'v' .. group, group_pass, 'V', pass)
      redis.call('ZREM', KEYS[10], group)
    end
    if request_id ~= '' then
      redis.call('SET', KEYS[8], cmsgpack.pack({ 'dequeue', 0, task_id, token }), 'PX', request_ttl_raw)
    end
    return { 0, task_id, values[3], attempts, token, deadline_ms }
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
local SCRIPT_NAME = 'queue.group_dequeue'
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
    local layout, culprit = { 'zset', 'zset', 'zset', 'zset', 'hash', 'list', 'string', 'string', 'zset', 'zset', 'hash', 'zset' }, 'a key'
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
-- ---------------------------------------------------------------------------------------------
-- groups (lua/include/groups.lua.j2): fair groups, concurrency caps and pause of a plain queue,
-- the helpers of the queue.group_* scripts. They take the queue's 8 KEYS (include/queue.lua.j2)
-- then gready, gring, groups and gwait (include/group_keys.j2): 12 KEYS, one hash tag.
--
-- Invariants the scripts rely on (and keep):
--   * A task enqueued with a group has "g"..id = its group in the tasks hash for as long as it
--     exists (ready, delayed, leased or dead). While ready it is a member of gready (never of
--     ready): group_member(group, ready score, id), so ZRANGEBYLEX over the group's prefix gives
--     its head, highest priority first, FIFO within a priority (the queue's one seq).
--   * "G" = "1" in the tasks hash once the queue has had a group (group_enqueue, set_group,
--     set_limits; never removed). queue.dequeue then answers GROUPED (it cannot pick fairly
--     without these keys), and queue.ack, queue.nack and queue.requeue_dead answer GROUPED for a
--     task that has a group; queue.enqueue and queue.extend work as before.
--   * A group is a member of gring exactly while it is eligible (it has a ready task, it is not
--     paused and it holds fewer leases ("a"..g) than its cap ("c"..g, 0: none)) and its rate
--     allows a take now; eligible but held back by its rate, it is in gwait instead, scored by
--     the ms at which its rate allows one (a dequeue puts the due ones back, at most
--     16 per call). Its score is its pass; out of the ring the pass is kept in
--     "v"..g. Every script that changes one of those for a group settles that group (settle())
--     in the same call; "" (the tasks without a group, in ready) joins the ring at the first
--     group_dequeue that finds ready non-empty.
--   * Rate limits are GCRA on the server clock: interval I = 1000 / per_second ms, burst B; a take
--     is allowed at now when TAT - (B - 1) * I <= now, and sets TAT = max(TAT, now) + I (so B at
--     once, then one per I). The queue's ("R", "B", "T") bounds every take, a group's its own.
--   * Stride scheduling: a take from group g sets the queue's pass "V" to g's pass, then adds
--     1/weight to it; a group that joins the ring gets max(its kept pass, V), so a group that was
--     idle gains no credit, and a flood in one group does not delay the others.
--   * "a"..g counts the held leases of g's tasks: +1 per take, -1 per ack, nack or reclaim.
--   * The take state ("V", "a"..g, "v"..g) lives in the tasks hash, which every take and ack
--     reads and writes anyway; the groups hash holds settings only, so it exists only once a
--     setting was made (the lean group_dequeue skips reading it while it does not exist).
-- ---------------------------------------------------------------------------------------------
local K_GREADY, K_GRING, K_GROUPS, K_GWAIT = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local GROUP_KEY_COUNT = 12
local MAX_GROUP_BYTES = 256
local MAX_WEIGHT = 1000
local MAX_ACTIVE = 1000000

-- The prefix of every gready member of `group`: its length in 3 digits, then its bytes (so no
-- group's prefix is a prefix of another's).
local function group_prefix(group)
  return string.format('%03d', #group) .. group
end

-- The gready member of a ready task of `group` with ready score `score` (below 2^53: 14 hex digits).
local function group_member(group, score, task_id)
  return group_prefix(group) .. string.format('%014x', score) .. task_id
end

-- The ready task of `group` after skipping `offset` of them ("": the ready key): its id, score and
-- gready member (nil for ""), or nil when there is none. A read.
local function group_head(group, offset)
  if group == '' then
    local found = read('ZRANGE', K_READY, offset, offset, 'WITHSCORES')
    if found[1] then
      return found[1], tonumber(found[2]), nil
    end
    return nil
  end
  local prefix = group_prefix(group)
  local found = read('ZRANGEBYLEX', K_GREADY, '[' .. prefix, '(' .. prefix .. '\255', 'LIMIT', offset, 1)
  local member = found[1]
  if not member then
    return nil
  end
  local at = #prefix + 1
  local hex = string.sub(member, at, at + 13)
  if #member <= at + 13 or not string.find(hex, '^%x+$') then
    fail('CORRUPT', 'the ready member ' .. show(member) .. ' of group ' .. show(group) .. ' is malformed')
  end
  return string.sub(member, at + 14), tonumber(hex, 16), member
end

-- A stored integer of the groups hash in [low, high] (absent: nil), else CORRUPT.
local function stored_int(raw, what, low, high)
  if not raw then
    return nil
  end
  local value = #raw <= 17 and string.find(raw, '^%d+$') and tonumber(raw)
  if not value or value < low or value > high then
    fail('CORRUPT', what .. ' holds ' .. show(raw) .. ', expected an integer ' .. low .. '..' .. decimal(high))
  end
  return value
end

-- A stored pass (a finite number; absent: nil), else CORRUPT.
local function stored_pass(raw, what)
  if not raw then
    return nil
  end
  local value = tonumber(raw)
  if not value or value ~= value or value == math.huge or value == -math.huge then
    fail('CORRUPT', what .. ' holds ' .. show(raw) .. ', expected a number')
  end
  return value
end

-- A rate limit's state from its stored interval, burst and TAT (interval nil: no limit).
local function stored_rate(state, interval, burst, tat, what)
  state.interval = stored_pass(interval, 'the rate interval of ' .. what)
  state.burst = stored_int(burst, 'the burst of ' .. what, 1, MAX_ACTIVE) or 1
  state.tat = stored_pass(tat, 'the rate time of ' .. what)
  state.tat_was = state.tat
  return state
end

-- The state of the queue and of each group of `names` (a list of distinct names), read with one
-- HMGET of the groups hash (settings), one of the tasks hash (the take state: "V", "a"..g,
-- "v"..g) and one ZSCORE of gring and of gwait per group. Each group's state: weight, cap (0:
-- none), active, paused, kept (pass kept out of the ring), in_ring, ring_pass, pass (the ring's,
-- else nil until it joins), active_was, waiting (in gwait), and its rate (interval, burst, tat).
-- The queue's: pass ("V", 0 at first), cap, paused and its rate.
-- `ring` (optional) maps groups known to be in gring to their score (no ZSCORE for them).
local function read_groups(names, ring)
  -- (Not a table constructor starting with 'C': luasched.acl reads a quoted upper-case word
  -- after "(" or "{" as a command the script issues.)
  local fields, taking = {}, {}
  fields[1], fields[2], fields[3], fields[4], fields[5] = 'C', 'S', 'R', 'B', 'T'
  taking[1] = 'V'
  for _, name in ipairs(names) do
    local size = #fields
    fields[size + 1], fields[size + 2], fields[size + 3] = 'w' .. name, 'c' .. name, 's' .. name
    fields[size + 4], fields[size + 5], fields[size + 6] = 'r' .. name, 'b' .. name, 't' .. name
    size = #taking
    taking[size + 1], taking[size + 2] = 'a' .. name, 'v' .. name
  end
  local values = read('HMGET', K_GROUPS, unpack(fields))
  local took = read('HMGET', K_TASKS, unpack(taking))
  local queue = stored_rate({
    pass = stored_pass(took[1], 'the queue pass') or 0,
    cap = stored_int(values[1], 'the queue cap', 0, MAX_ACTIVE) or 0,
    paused = values[2] == '1',
  }, values[3], values[4], values[5], 'the queue')
  local states = {}
  for index, name in ipairs(names) do
    local at = 6 * index
    local what = show(name)
    local ring_pass = ring and ring[name]
    if not ring_pass then
      ring_pass = stored_pass(read('ZSCORE', K_GRING, name), 'the ring score of ' .. what)
    end
    local active = stored_int(took[2 * index], 'the lease count of ' .. what, 0, MAX_SAFE_INTEGER) or 0
    states[name] = stored_rate({
      weight = stored_int(values[at], 'the weight of ' .. what, 1, MAX_WEIGHT) or 1,
      cap = stored_int(values[at + 1], 'the cap of ' .. what, 0, MAX_ACTIVE) or 0,
      active = active,
      active_was = active,
      paused = values[at + 2] == '1',
      kept = stored_pass(took[2 * index + 1], 'the kept pass of ' .. what),
      in_ring = ring_pass ~= nil,
      ring_pass = ring_pass,
      pass = ring_pass,
      -- (a group in the ring is not in gwait)
      waiting = ring_pass == nil and read('ZSCORE', K_GWAIT, name) ~= false,
    }, values[at + 3], values[at + 4], values[at + 5], what)
  end
  return queue, states
end

-- ms until the rate of `state` (a group's or the queue's) allows one more take at `now_ms` (0: now).
local function rate_wait(state, now_ms)
  if not state.interval or not state.tat then
    return 0
  end
  local allowed_at = state.tat - (state.burst - 1) * state.interval
  return allowed_at > now_ms and allowed_at - now_ms or 0
end

-- Counts one take at `now_ms` against the rate of `state` (GCRA).
local function rate_take(state, now_ms)
  if state.interval then
    state.tat = math.max(state.tat or now_ms, now_ms) + state.interval
  end
end

-- Whether a group in `state` may be taken from, given whether it has a ready task.
local function group_eligible(state, has_ready)
  return has_ready and not state.paused and (state.cap == 0 or state.active < state.cap)
end

-- The pass of a group that (re)joins the ring now: its kept pass, at least the queue's `pass`.
local function join_pass(state, pass)
  return state.pass or math.max(state.kept or pass, pass)
end

-- Writes what changed of group `name` (its lease count, its rate time, its place in the ring)
-- so the ring invariant holds at `now_ms`: in gring with its pass while `eligible` and allowed by
-- its rate, in gwait while only its rate holds it back, else in neither (its pass kept).
-- Cannot fail: every key it writes was read before the caller's first write.
local function settle(name, state, eligible, queue_pass, now_ms)
  if name ~= '' and state.active ~= state.active_was then
    if state.active > 0 then
      redis.call('HSET', K_TASKS, 'a' .. name, state.active)
    else
      redis.call('HDEL', K_TASKS, 'a' .. name)
    end
  end
  if state.tat ~= state.tat_was then
    redis.call('HSET', K_GROUPS, 't' .. name, state.tat)
  end
  local wait = eligible and rate_wait(state, now_ms) or 0
  if wait > 0 then
    redis.call('ZADD', K_GWAIT, math.ceil(now_ms + wait), name)
    eligible = false
  elseif state.waiting then
    redis.call('ZREM', K_GWAIT, name)
  end
  if eligible then
    local pass = join_pass(state, queue_pass)
    if pass ~= state.ring_pass then
      redis.call('ZADD', K_GRING, pass, name)
    end
    if state.kept then
      redis.call('HDEL', K_TASKS, 'v' .. name)
    end
  else
    if state.in_ring then
      redis.call('ZREM', K_GRING, name)
    end
    if state.pass and state.pass ~= state.kept then
      redis.call('HSET', K_TASKS, 'v' .. name, state.pass)
    end
  end
end
local function main()
  key_count(GROUP_KEY_COUNT)
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

  -- Reads, which also check every written key's type. Bounded: LIMIT on both sweeps.
  local now = decimal(now_ms)
  local due = read('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, 16)
  local expired = read('ZRANGEBYSCORE', K_LEASED, '-inf', now, 'LIMIT', 0, 16)
  local leased_count = read('ZCARD', K_LEASED)
  read('ZCARD', K_GREADY)
  -- Groups whose rate allows a take again (due in gwait): they go back to the ring.
  local unparked, next_parked = {}, read('ZRANGE', K_GWAIT, 0, 0, 'WITHSCORES')
  if next_parked[1] and tonumber(next_parked[2]) <= now_ms then
    unparked = read('ZRANGEBYSCORE', K_GWAIT, '-inf', now, 'LIMIT', 0, 16)
    next_parked = read('ZRANGE', K_GWAIT, #unparked, #unparked, 'WITHSCORES')
  end
  local fields = { 'seq', 'fence', 'm' .. ack_task_id, 'g' .. ack_task_id }
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
  for _, task_id in ipairs(moving) do
    fields[#fields + 1] = 'm' .. task_id
    fields[#fields + 1] = 'g' .. task_id
  end
  local values = read('HMGET', K_TASKS, unpack(fields))
  local seq = stored_uint_or_nil(values[1], 'the seq field') or 0
  local fence = stored_uint_or_nil(values[2], 'the fence field') or 0
  local ack_group = nil
  if acking then
    local raw = values[3]
    local meta = raw and parse_meta(raw, ack_task_id)
    if not meta or meta.state ~= 'L' or meta.token ~= ack_token then
      fail('STALE', 'the lease of task ' .. show(ack_task_id) .. ' with token ' .. decimal(ack_token)
        .. ' is no longer held')
    end
    ack_group = values[4]
  end

  -- The groups this call looks at, each with the tasks that become ready in it now (extras).
  local entries, names = {}, {}
  local function entry(name)
    local found = entries[name]
    if not found then
      found = { name = name, extras = {}, next_extra = 1, offset = 0, freed = 0 }
      entries[name] = found
      names[#names + 1] = name
    end
    return found
  end
  if ack_group then
    entry(ack_group).freed = 1
  end
  local died, due_count = {}, #due
  for index, task_id in ipairs(moving) do
    local meta = existing_meta(values[3 + 2 * index], task_id)
    local group = values[4 + 2 * index] or nil
    local from_delayed = index <= due_count
    if not from_delayed and group then
      entry(group).freed = entry(group).freed + 1
    end
    if from_delayed or meta.attempts < meta.max_attempts then
      seq = seq + 1
      local extras = entry(group or '').extras
      extras[#extras + 1] = { id = task_id, score = ready_score(meta.priority, seq), meta = meta, group = group }
    else
      died[#died + 1] = { id = task_id, meta = meta }
    end
  end
  check_seq(seq)
  -- The ring's first `count` groups: with every group that gains a ready task or frees a lease in
  -- this call, they hold every group this call can take from (each take changes one group's pass,
  -- so after k < count takes one of the first `count` is still unchanged, and no group behind it
  -- in the ring comes before it).
  local top, ring = read('ZRANGE', K_GRING, 0, count - 1, 'WITHSCORES'), {}
  for position = 1, #top, 2 do
    entry(top[position])
    ring[top[position]] = stored_pass(top[position + 1], 'the ring score of ' .. show(top[position]))
  end
  for _, name in ipairs(unparked) do
    entry(name)
  end
  if read('ZRANGE', K_READY, 0, 0)[1] then
    entry('')
  end
  local queue, states = read_groups(names, ring)
  local pass = queue.pass
  for _, name in ipairs(names) do
    local item = entries[name]
    local state = states[name]
    state.active = math.max(0, state.active - item.freed)
    table.sort(item.extras, function(a, b) return a.score < b.score end)
  end

  -- The next ready task of a group: the lower score of its next stored head and its next extra.
  local function peek(item)
    if item.head == nil then
      local task_id, score, member = group_head(item.name, item.offset)
      item.head = task_id and { id = task_id, score = score, member = member } or false
    end
    local extra = item.extras[item.next_extra]
    if item.head and (not extra or item.head.score < extra.score) then
      return item.head
    end
    return extra
  end

  -- The takes: each from the eligible group with the lowest (pass, name), as gring orders them.
  -- Leases held in the whole queue once the ack and the reclaims are done.
  local held = leased_count - (#moving - due_count) - (acking and 1 or 0)
  local picks = {}
  for _ = 1, count do
    if queue.paused or (queue.cap > 0 and held >= queue.cap) or rate_wait(queue, now_ms) > 0 then
      break
    end
    local best, best_pass = nil, nil
    for _, name in ipairs(names) do
      local state = states[name]
      if group_eligible(state, peek(entries[name]) ~= nil) and rate_wait(state, now_ms) == 0 then
        local candidate_pass = join_pass(state, pass)
        if not best or candidate_pass < best_pass or (candidate_pass == best_pass and name < best.name) then
          best, best_pass = entries[name], candidate_pass
        end
      end
    end
    if not best then
      break
    end
    local task = peek(best)
    if task == best.head then
      best.offset = best.offset + 1
      best.head = nil
    else
      best.next_extra = best.next_extra + 1
      task.taken = true
    end
    local state = states[best.name]
    pass = best_pass
    state.pass = best_pass + 1 / state.weight
    state.active = state.active + 1
    rate_take(state, now_ms)
    rate_take(queue, now_ms)
    held = held + 1
    picks[#picks + 1] = task
    task.group = best.name
  end

  -- Payload of every take, meta of the takes that were ready before this call.
  local taken = #picks
  if taken > 0 then
    -- The tokens are fence + 1 .. fence + taken (the loop below counts them up), by the rule
    -- every lease token follows (include/fence.lua.j2).
    fence = first_token(fence, now_us, taken, 'the fence field') - 1
  end
  local take_fields = {}
  for index, task in ipairs(picks) do
    take_fields[2 * index - 1] = 'p' .. task.id
    take_fields[2 * index] = 'm' .. task.id
  end
  local take_values = taken > 0 and read('HMGET', K_TASKS, unpack(take_fields)) or {}
  for index, task in ipairs(picks) do
    task.payload = take_values[2 * index - 1] or ''
    task.meta = task.meta or existing_meta(take_values[2 * index], task.id)
  end
  -- Where each group stands after the takes (reads only), and, when nothing was taken, the
  -- least ms until a rate limit allows a take (nil: no rate holds anything back).
  local eligible_after, left_ready, limit_wait = {}, 0, nil
  local function limited(wait)
    if wait > 0 then
      limit_wait = math.min(limit_wait or wait, wait)
    end
  end
  for _, name in ipairs(names) do
    local has_ready = peek(entries[name]) ~= nil
    eligible_after[name] = group_eligible(states[name], has_ready)
    if eligible_after[name] then
      limited(rate_wait(states[name], now_ms))
    end
  end
  limited(rate_wait(queue, now_ms))
  if next_parked[1] and not entries[next_parked[1]] then
    limited(math.max(1, tonumber(next_parked[2]) - now_ms))
  end
  if #died > 0 then
    read('ZCARD', K_DEAD)
  end
  for _, item in pairs(entries) do
    for _, extra in ipairs(item.extras) do
      if not extra.taken then
        left_ready = left_ready + 1
      end
    end
  end
  local waiting = left_ready > 0 and waiters_present(K_WAITING, K_WAKE)

  -- Writes. The first one goes through first_write; every key below was read above.
  local wrote = false
  local function write(...)
    if wrote then
      return redis.call(...)
    end
    wrote = true
    return first_write(...)
  end
  local taken_ready, taken_gready, removed_leased, delayed_out = {}, {}, {}, {}
  local leased_args, ready_args, gready_args, dead_args, meta_args = {}, {}, {}, {}, {}
  if acking then
    removed_leased[1] = ack_task_id
  end
  local reply = { 0 }
  for _, task in ipairs(picks) do
    local meta = task.meta
    fence = fence + 1
    meta.attempts = meta.attempts + 1
    meta.token = fence
    meta.state = 'L'
    meta.at_ms = now_ms + lease_ms
    meta.worker = worker_id
    if not task.taken then
      if task.member then
        taken_gready[#taken_gready + 1] = task.member
      else
        taken_ready[#taken_ready + 1] = task.id
      end
    end
    leased_args[#leased_args + 1] = meta.at_ms
    leased_args[#leased_args + 1] = task.id
    meta_args[#meta_args + 1] = 'm' .. task.id
    meta_args[#meta_args + 1] = format_meta(meta)
    local size = #reply
    reply[size + 1] = task.id
    reply[size + 2] = task.payload
    reply[size + 3] = meta.attempts
    reply[size + 4] = fence
    reply[size + 5] = meta.at_ms
  end
  for _, item in pairs(entries) do
    for _, extra in ipairs(item.extras) do
      if not extra.taken then
        extra.meta.state = 'R'
        extra.meta.at_ms = now_ms
        if extra.group then
          gready_args[#gready_args + 1] = 0
          gready_args[#gready_args + 1] = group_member(extra.group, extra.score, extra.id)
        else
          ready_args[#ready_args + 1] = extra.score
          ready_args[#ready_args + 1] = extra.id
        end
        meta_args[#meta_args + 1] = 'm' .. extra.id
        meta_args[#meta_args + 1] = format_meta(extra.meta)
      end
    end
  end
  for index = 1, #moving do
    if index <= due_count then
      delayed_out[#delayed_out + 1] = moving[index]
    else
      removed_leased[#removed_leased + 1] = moving[index]
    end
  end
  for _, dead in ipairs(died) do
    dead.meta.state = 'X'
    dead.meta.at_ms = now_ms
    dead_args[#dead_args + 1] = now
    dead_args[#dead_args + 1] = dead.id
    meta_args[#meta_args + 1] = 'm' .. dead.id
    meta_args[#meta_args + 1] = format_meta(dead.meta)
    meta_args[#meta_args + 1] = 'r' .. dead.id
    meta_args[#meta_args + 1] = 'lease expired'
  end

  if #taken_ready > 0 then
    write('ZREM', K_READY, unpack(taken_ready))
  end
  if #taken_gready > 0 then
    write('ZREM', K_GREADY, unpack(taken_gready))
  end
  if #delayed_out > 0 then
    write('ZREM', K_DELAYED, unpack(delayed_out))
  end
  if #removed_leased > 0 then
    write('ZREM', K_LEASED, unpack(removed_leased))
  end
  if acking then
    write('HDEL', K_TASKS, 'p' .. ack_task_id, 'm' .. ack_task_id, 'r' .. ack_task_id, 'g' .. ack_task_id)
  end
  if #leased_args > 0 then
    write('ZADD', K_LEASED, unpack(leased_args))
  end
  if #ready_args > 0 then
    write('ZADD', K_READY, unpack(ready_args))
  end
  if #gready_args > 0 then
    write('ZADD', K_GREADY, unpack(gready_args))
  end
  if #dead_args > 0 then
    write('ZADD', K_DEAD, unpack(dead_args))
  end
  meta_args[#meta_args + 1] = 'seq'
  meta_args[#meta_args + 1] = seq
  meta_args[#meta_args + 1] = 'fence'
  meta_args[#meta_args + 1] = fence
  write('HSET', K_TASKS, unpack(meta_args))
  for _, name in ipairs(names) do
    settle(name, states[name], eligible_after[name], pass, now_ms)
  end
  if taken > 0 then
    redis.call('HSET', K_TASKS, 'V', pass)
  end
  if queue.tat ~= queue.tat_was then
    redis.call('HSET', K_GROUPS, 'T', queue.tat)
  end
  if waiting then
    push_wake(K_WAKE, left_ready)
  end

  if taken == 0 then
    reply = nothing_taken(now_ms, wait_ms, K_WAITING)
    if limit_wait then
      local wait = math.ceil(limit_wait)
      reply[1] = reply[1] == -1 and wait or math.min(reply[1], wait)
    end
  end
  if acking or taken > 0 then
    local entry_record = { 'dequeue', acking and 1 or 0 }
    for index = 1, taken do
      entry_record[#entry_record + 1] = reply[5 * index - 3]
      entry_record[#entry_record + 1] = reply[5 * index]
    end
    record_request(request_id, request_ttl_ms, entry_record)
  end
  return reply
end

return run(main)
