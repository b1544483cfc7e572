--@script     queue.set_group
--@summary    Sets the weight, the concurrency cap and the pause of one group of a queue (each: -1 keeps it as it is),
--@+          and puts the group in or out of the ring of groups queue.group_dequeue takes from. The weight sets the
--@+          group's share of takes among the groups that have ready tasks (1 for every group: round robin); a group
--@+          holding max_active leases is skipped until one of them is acked, nacked or expires; a paused group is
--@+          skipped until resumed (its tasks stay). Marks the queue as having groups. Answers the settings now.
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
--@arg        group       string:1..256  The group.
--@arg        weight      int:-1..1000  Its weight, 1..1000 (absent: 1); -1: keep; 0 is refused.
--@arg        max_active  int:-1..1000000  Most leases of its tasks held at once (0: no cap, the default); -1: keep.
--@arg        paused      int:-1..1  1: paused, 0: not (the default); -1: keep.
--@reply      array{weight:int, max_active:int, paused:int:0..1, active:int}  The group's settings after the call and
--@+          the leases of its tasks held now.
--@error      ARG  Not 12 keys or 4 arguments, or an argument out of its range (weight 0 included).
--@error      CORRUPT  A key of the queue holds another type or shape than the layout; nothing changed.
--@complexity O(log n + log g) for n tasks and g groups
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
        return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[1] must start with luasched:{<namespace>}: (a namespace of at least one byte, without { or })')
      end
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[1] must be luasched:{ns}:q:ready:<queue> in the namespace of KEYS[1]')
    end
    local plen = #prefix
    local key
    key = keys[2]
    if key and key ~= prefix .. 'q:delayed:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[2] must be luasched:{ns}:q:delayed:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[3]
    if key and key ~= prefix .. 'q:leased:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[3] must be luasched:{ns}:q:leased:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[4]
    if key and key ~= prefix .. 'q:dead:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[4] must be luasched:{ns}:q:dead:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[5]
    if key and key ~= prefix .. 'q:tasks:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[5] must be luasched:{ns}:q:tasks:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[6]
    if key and key ~= prefix .. 'q:wake:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[6] must be luasched:{ns}:q:wake:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[7]
    if key and key ~= prefix .. 'q:waiting:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[7] must be luasched:{ns}:q:waiting:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[8]
    if key and (sub(key, 1, plen) ~= prefix or sub(key, plen + 1, plen + 6) ~= 'q:req:') then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[8] must be luasched:{ns}:q:req:<request_id>:<queue> in the namespace of KEYS[1]')
    end
    key = keys[9]
    if key and key ~= prefix .. 'q:gready:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[9] must be luasched:{ns}:q:gready:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[10]
    if key and key ~= prefix .. 'q:gring:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[10] must be luasched:{ns}:q:gring:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[11]
    if key and key ~= prefix .. 'q:groups:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[11] must be luasched:{ns}:q:groups:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[12]
    if key and key ~= prefix .. 'q:gwait:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.set_group: KEYS[12] must be luasched:{ns}:q:gwait:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
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
local SCRIPT_NAME = 'queue.set_group'
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
  arg_count(4, 4)
  local group = arg_string(1, 'group', 1, MAX_GROUP_BYTES)
  local weight = arg_int(2, 'weight', -1, MAX_WEIGHT)
  local max_active = arg_int(3, 'max_active', -1, MAX_ACTIVE)
  local paused = arg_int(4, 'paused', -1, 1)
  if weight == 0 then
    fail('ARG', 'weight must be between 1 and ' .. MAX_WEIGHT .. ' (or -1: keep), got 0')
  end
  local now_ms = server_now_ms()
  read('HGET', K_TASKS, 'G')
  local queue, states = read_groups({ group })
  local state = states[group]
  local has_ready = group_head(group, 0) ~= nil
  if weight > 0 then
    state.weight = weight
  end
  if max_active >= 0 then
    state.cap = max_active
  end
  if paused >= 0 then
    state.paused = paused == 1
  end
  local eligible = group_eligible(state, has_ready)
  local waiting = eligible and not state.in_ring and waiters_present(K_WAITING, K_WAKE)
  first_write('HSET', K_GROUPS, 'w' .. group, state.weight, 'c' .. group, state.cap)
  redis.call('HSET', K_TASKS, 'G', '1')
  if state.paused then
    redis.call('HSET', K_GROUPS, 's' .. group, '1')
  else
    redis.call('HDEL', K_GROUPS, 's' .. group)
  end
  settle(group, state, eligible, queue.pass, now_ms)
  if waiting then
    push_wake(K_WAKE, 1)
  end
  return { state.weight, state.cap, state.paused and 1 or 0, state.active }
end

return run(main)
