--@script     queue.node_nack
--@summary    Gives a leased dispatched task back as a failed attempt: ready again in its node's queue after delay_ms
--@+          (or, with delay_ms = -1, after min(backoff_max_ms, backoff_base_ms * 2^(attempt - 1))), still charged to
--@+          the node; or, when it has had max_attempts leases, into the dead letters with `reason`, its cost given
--@+          back to the node's load. Refused with STALE when the lease is no longer held under that token. A
--@+          non-empty request_id records the reply: replaying it within request_ttl_ms acts no second time.
--@key        ready       zset    luasched:{ns}:d:ready:<queue> -- ready dispatched tasks, all scored 0 and ordered by
--@+          member: hex(node id) ":" 16-digit (511 - priority) * 2^43 + seq, then the task id; one node's ready
--@+          tasks are one lex range, best first.
--@key        delayed     zset    luasched:{ns}:d:delayed:<queue> -- delayed / backing-off task ids by due time (server ms).
--@key        leased      zset    luasched:{ns}:d:leased:<queue> -- leased task ids by lease deadline (server ms).
--@key        dead        zset    luasched:{ns}:d:dead:<queue> -- dead-letter task ids by time of death (server ms).
--@key        tasks       hash    luasched:{ns}:d:tasks:<queue> -- "p"..id payload, "m"..id meta (as queue.*), "n"..id
--@+          route "cost strategy hex(node id)", "k"..id routing key (slot strategy), "r"..id last reason, "seq", "fence", "layout" (as queue.*).
--@key        assigned    zset    luasched:{ns}:d:assigned:<queue> -- leased and delayed tasks by node, scored 0:
--@+          member hex(node id) ":" task id.
--@key        request     string  luasched:{ns}:d:req:<request_id>:<queue> -- the recorded reply of a request id
--@+          (unused when request_id is empty); lives request_ttl_ms.
--@key        node_index  hash    luasched:{ns}:nodes:index -- node id -> its index.
--@key        node_id     hash    luasched:{ns}:nodes:id -- index -> node id.
--@key        weight      hash    luasched:{ns}:nodes:weight -- index -> weight.
--@key        capacity    hash    luasched:{ns}:nodes:capacity -- index -> capacity (absent: unlimited).
--@key        deadline    zset    luasched:{ns}:nodes:deadline -- index scored by its heartbeat deadline
--@+          (server ms); live while deadline > now.
--@key        draining    set     luasched:{ns}:nodes:draining -- indexes of draining nodes.
--@key        slot_table  string  luasched:{ns}:slots:owner -- the slot table (slot s: bytes 2s, 2s+1, owner index).
--@key        load        hash    luasched:{ns}:pick:load -- index -> current load (absent: 0).
--@key        util        zset    luasched:{ns}:pick:util -- registered, non-draining indexes by utilization.
--@key        ring        zset    luasched:{ns}:pick:ring -- registered, non-draining indexes by index.
--@key        state       hash    luasched:{ns}:pick:state -- pick bookkeeping (round-robin cursor).
--@key        weighted    zset    luasched:{ns}:pick:weighted -- live eligible indexes by cumulative weight (lazy).
--@key        wake        list    luasched:{ns}:d:wake:<queue> -- wake-up signals of blocked node workers: each
--@+          signal is the lowercase hex of the id of a node that got a task while a worker of it blocked (see
--@+          waiters). A worker of node N blocks with BLPOP on its own list luasched:{ns}:d:node-wake:<hex N>:<queue>
--@+          and on this one; when it pops a signal of another node it pushes that signal on that node's own list
--@+          (LPUSH, LTRIM 0 15, PEXPIRE 2000); no script touches the own lists. At most
--@+          16 entries, expires 2000 ms after a push.
--@key        waiters     zset    luasched:{ns}:d:waiters:<queue> -- hex(node id) of each node a worker of which
--@+          blocks, scored by the server ms until which it waits (queue.node_dequeue with wait_ms: only ever
--@+          lengthened; lapsed ones removed then); dispatch, node_nack, redispatch, dispatch_requeue_dead and
--@+          promotion/reclaim push a node's signal on wake only while its score is after the server's now.
--@arg        task_id          string:1..1024  The leased task.
--@arg        token            int:1..9007199254740991  The fencing token of the lease.
--@arg        delay_ms         int:-1..31536000000  Ready again after this many ms of the server's clock; -1: backoff.
--@arg        reason           string:0..4096  Why it failed (kept as the task's last reason).
--@arg        backoff_base_ms  int:0..31536000000  Backoff of the first failed attempt (delay_ms = -1).
--@arg        backoff_max_ms   int:0..31536000000  Longest backoff (delay_ms = -1).
--@arg        request_id       string:0..64  Idempotency key of this call, [0-9A-Za-z_-] ("": none); also part of the request key name.
--@arg        request_ttl_ms   int:1..86400000  How long the record of request_id is kept.
--@arg        mode[0..1]       int:0..2  Optional (absent: 0). 0: a failed attempt, as above. 1: give the lease back
--@+          uncharged (a worker shutting down): ready now, its attempt not counted, its last reason kept
--@+          (delay_ms, reason, the backoff and max_attempts unused). 2: into the dead letters now, with `reason`.
--@reply      array{state:string, delay_ms:int}  state "ready" (delay_ms 0), "delayed" (ready again in delay_ms) or
--@+          "dead" (delay_ms -1).
--@error      ARG  Not 21 keys or 8..9 arguments, an argument out of its range, or a request id used by another call.
--@error      STALE  The lease is no longer held; nothing changed.
--@error      CORRUPT  A key holds another type or shape than the layout; nothing changed.
--@complexity O(log n) for n tasks
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
    local prefix, tail_queue = string.match(first, '^(luasched:{[^{}]+}:)d:ready:(.*)$')
    if not prefix then
      if not string.find(first, '^luasched:{[^{}]+}:') then
        return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[1] must start with luasched:{<namespace>}: (a namespace of at least one byte, without { or })')
      end
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[1] must be luasched:{ns}:d:ready:<queue> in the namespace of KEYS[1]')
    end
    local plen = #prefix
    local key
    key = keys[2]
    if key and key ~= prefix .. 'd:delayed:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[2] must be luasched:{ns}:d:delayed:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[3]
    if key and key ~= prefix .. 'd:leased:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[3] must be luasched:{ns}:d:leased:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[4]
    if key and key ~= prefix .. 'd:dead:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[4] must be luasched:{ns}:d:dead:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[5]
    if key and key ~= prefix .. 'd:tasks:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[5] must be luasched:{ns}:d:tasks:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[6]
    if key and key ~= prefix .. 'd:assigned:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[6] must be luasched:{ns}:d:assigned:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[7]
    if key and (sub(key, 1, plen) ~= prefix or sub(key, plen + 1, plen + 6) ~= 'd:req:') then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[7] must be luasched:{ns}:d:req:<request_id>:<queue> in the namespace of KEYS[1]')
    end
    key = keys[8]
    if key and key ~= prefix .. 'nodes:index' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[8] must be luasched:{ns}:nodes:index in the namespace of KEYS[1]')
    end
    key = keys[9]
    if key and key ~= prefix .. 'nodes:id' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[9] must be luasched:{ns}:nodes:id in the namespace of KEYS[1]')
    end
    key = keys[10]
    if key and key ~= prefix .. 'nodes:weight' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[10] must be luasched:{ns}:nodes:weight in the namespace of KEYS[1]')
    end
    key = keys[11]
    if key and key ~= prefix .. 'nodes:capacity' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[11] must be luasched:{ns}:nodes:capacity in the namespace of KEYS[1]')
    end
    key = keys[12]
    if key and key ~= prefix .. 'nodes:deadline' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[12] must be luasched:{ns}:nodes:deadline in the namespace of KEYS[1]')
    end
    key = keys[13]
    if key and key ~= prefix .. 'nodes:draining' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[13] must be luasched:{ns}:nodes:draining in the namespace of KEYS[1]')
    end
    key = keys[14]
    if key and key ~= prefix .. 'slots:owner' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[14] must be luasched:{ns}:slots:owner in the namespace of KEYS[1]')
    end
    key = keys[15]
    if key and key ~= prefix .. 'pick:load' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[15] must be luasched:{ns}:pick:load in the namespace of KEYS[1]')
    end
    key = keys[16]
    if key and key ~= prefix .. 'pick:util' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[16] must be luasched:{ns}:pick:util in the namespace of KEYS[1]')
    end
    key = keys[17]
    if key and key ~= prefix .. 'pick:ring' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[17] must be luasched:{ns}:pick:ring in the namespace of KEYS[1]')
    end
    key = keys[18]
    if key and key ~= prefix .. 'pick:state' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[18] must be luasched:{ns}:pick:state in the namespace of KEYS[1]')
    end
    key = keys[19]
    if key and key ~= prefix .. 'pick:weighted' then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[19] must be luasched:{ns}:pick:weighted in the namespace of KEYS[1]')
    end
    key = keys[20]
    if key and key ~= prefix .. 'd:wake:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[20] must be luasched:{ns}:d:wake:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[21]
    if key and key ~= prefix .. 'd:waiters:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.node_nack: KEYS[21] must be luasched:{ns}:d:waiters:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
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
local SCRIPT_NAME = 'queue.node_nack'
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
    local layout, culprit = { 'zset', 'zset', 'zset', 'zset', 'hash', 'zset', 'string', 'hash', 'hash', 'hash', 'hash', 'zset', 'set', 'string', 'hash', 'zset', 'zset', 'hash', 'zset', 'list', 'zset' }, 'a key'
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
-- dispatch (lua/include/dispatch.lua.j2): tasks dispatched to nodes (queue.dispatch and the
-- queue.node_* / queue.redispatch scripts). Needs prelude. Brings in the queue helpers
-- (include/queue.lua.j2) and the load's charge and release (include/pick_charge.lua.j2), bound
-- to these 21 KEYS (include/dispatch_pick.lua.j2 adds the picks):
--   1 d:ready:<queue>    ZSET  ready tasks by node: member hex(node) ":" score(16 digits) task id
--   2 d:delayed:<queue>  ZSET  delayed task ids by due time     3 d:leased:<queue> ZSET by deadline
--   4 d:dead:<queue>     ZSET  dead letters by time of death    5 d:tasks:<queue>  HASH
--   6 d:assigned:<queue> ZSET  leased and delayed tasks by node: member hex(node) ":" task id
--   7 d:req:<request_id>:<queue>  STRING recorded reply of a request id
--   8..19 nodes:index, nodes:id, nodes:weight, nodes:capacity, nodes:deadline, nodes:draining,
--         slots:owner, pick:load, pick:util, pick:ring, pick:state, pick:weighted
--   20 d:wake:<queue>     LIST   wake-up signals of blocked node workers: each one hex(node),
--                              the node that got work (its workers BLPOP it with their own
--                              d:node-wake:<hex(node)>:<queue>, where a worker of another node
--                              that popped the signal passes it on; no script touches that list)
--   21 d:waiters:<queue>  ZSET   hex(node) by the server ms until which a worker of it blocks
--
-- Invariants (on top of include/queue.lua.j2's, with "ready" = the node's lex range of d:ready):
--   * Every task has a route "n"..id = "cost S|L|T|W|R hex(node id)": the node it is assigned to
--     and the strategy that chose it (slot, least_loaded, two_choices, weighted, round_robin;
--     slot-routed tasks keep their routing key in "k"..id). A ready task is the member
--     hex(node) ":" %016d(score) id of d:ready; a leased or delayed one is also the member
--     hex(node) ":" id of d:assigned. hex() has no ":" so one node's members are one lex range.
--   * Load: every task counts `cost` on its node's pick:load from dispatch until it leaves the
--     node (acked, dead, redispatched); the scripts doing that give it back in the same call.
--     A node that was removed (or swept) lost its load with its index: nothing is given back.
-- ---------------------------------------------------------------------------------------------
local K_READY, K_DELAYED, K_LEASED, K_DEAD = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_TASKS, K_ASSIGNED, K_REQUEST = KEYS[5], KEYS[6], KEYS[7]
local K_INDEX, K_ID, K_WEIGHT, K_CAPACITY = KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local K_DEADLINE, K_DRAINING, K_SLOTS = KEYS[12], KEYS[13], KEYS[14]
local K_LOAD, K_UTIL, K_RING, K_STATE, K_WEIGHTED = KEYS[15], KEYS[16], KEYS[17], KEYS[18], KEYS[19]
local K_WAKE, K_WAITERS = KEYS[20], KEYS[21]
local DISPATCH_KEY_COUNT = 21
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
-- pick_score (lua/include/pick_score.lua.j2): a node's utilization score, the one formula shared
-- by the nodes.* scripts (which keep pick:util in step with the registry) and the pick.* scripts.
--
--   utilization = load / capacity, a double; ZADD gets it as '%.17g', which round-trips exactly,
--   so equal fractions (1/2, 2/4) get bit-identical scores and tie.
--   A node with unlimited capacity counts as capacity UNLIMITED_CAPACITY (2^50): it is never
--   full and ranks by its load among the unlimited ones, ahead of any busy limited node.
--   Capacity 0: the node never takes work; its score is 1 (full).
--   Full for a cost: load + cost > capacity. A node with score < 1 has room for cost 1 (integer
--   load < capacity), one with score >= 1 has room for no cost: so when the node with the
--   lowest score is full for cost 1, every node is.
-- Loads stay <= capacity <= 2^50 (a pick never charges past capacity), so integers stay exact.
-- ---------------------------------------------------------------------------------------------
local UNLIMITED_CAPACITY = 1125899906842624

-- The effective capacity of a raw nodes:capacity value (nil/false = unlimited).
local function effective_capacity(raw)
  if not raw then
    return UNLIMITED_CAPACITY
  end
  return tonumber(raw)
end

-- The pick:util score (a string for ZADD) of `load` on `capacity` (effective capacity).
local function utilization_score(load, capacity)
  if capacity <= 0 then
    return '1'
  end
  return string.format('%.17g', load / capacity)
end
-- ---------------------------------------------------------------------------------------------
-- pick (lua/include/pick.lua.j2): what the pick.* scripts share. Needs prelude.lua.j2.
-- Binds no KEYS: each pick script declares only the keys it touches and passes them here.
--
--   * Reads go through read(), which turns a wrong-type reply into CORRUPT; every key a pick
--     writes is read first, so no write can fail after another write was made.
--   * A candidate is live while its deadline (nodes:deadline) is strictly after the server's
--     now; the candidate sets (pick:util, pick:ring, pick:lru) also hold dead nodes until
--     nodes.sweep removes them, so walks skip them, examining at most SCAN_LIMIT members.
--   * Client randomness: ARGV integers in 0..2^53-1, reduced with math.fmod (exact for
--     doubles); the bias of r mod m is below m / 2^53, under 1e-5 for any m the registry allows.
-- ---------------------------------------------------------------------------------------------
local MAX_RANDOM = 9007199254740991
local fmod = math.fmod

-- A stored count (a load, a counter): absent (nil/false) gives 0; a value tonumber reads as an
-- integer in 0..2^53 - 1 is that integer, anything else is CORRUPT.
local function stored_count_or_zero(raw, what)
  if not raw then
    return 0
  end
  local value = tonumber(raw)
  if not value or value ~= math.floor(value) or value < 0 or value > MAX_SAFE_INTEGER then
    fail('CORRUPT', what .. ' holds ' .. show(raw) .. ', not an integer')
  end
  return value
end

-- ---------------------------------------------------------------------------------------------
-- pick_charge (lua/include/pick_charge.lua.j2): a node's load, charged and given back; shared by
-- the charging picks (pick_load), pick.release and the dispatch scripts (queue.dispatch and the
-- node-queue scripts, which charge every dispatched task to its node). Needs prelude, pick_score
-- and pick. The includer binds K_LOAD (pick:load), K_CAPACITY (nodes:capacity), K_UTIL
-- (pick:util) and K_ID (nodes:id).
--
--   * Reads first: load_and_capacity() and release_plan() only read (and so check the types of
--     the keys that charge() and release() write); charge() and release() only write (charge()
--     first runs the includer's before_charge read, if any).
--   * pick:util is written with XX: a draining node is no candidate and stays out of it (its
--     load is still kept, for the release).
-- ---------------------------------------------------------------------------------------------

-- A read of the includer about the node a charge goes to, run by charge() with the node id
-- before its writes (nil: none): queue.dispatch and queue.redispatch look at that node's
-- waiting marker there (include/dispatch_pick.lua.j2), before anything is written.
local before_charge = nil

-- Load and effective capacity of `index`, and its raw capacity (nil: unlimited).
local function load_and_capacity(index)
  local load = stored_count_or_zero(read('HGET', K_LOAD, index), 'pick:load')
  local capacity_raw = read('HGET', K_CAPACITY, index)
  return load, effective_capacity(capacity_raw), capacity_raw
end

-- What giving back `cost` of `index`'s load will write: a table for release(). Reads only.
local function release_plan(index, cost)
  local load, capacity = load_and_capacity(index)
  read('ZSCORE', K_UTIL, index)  -- a wrong type fails here, before the first write
  return { index = index, load = math.max(0, load - cost), capacity = capacity }
end

-- Writes a release_plan (the load never goes below 0; 0 is stored as no field). Cannot fail.
local function release(plan)
  if plan.load == 0 then
    redis.call('HDEL', K_LOAD, plan.index)
  else
    redis.call('HSET', K_LOAD, plan.index, decimal(plan.load))
  end
  redis.call('ZADD', K_UTIL, 'XX', utilization_score(plan.load, plan.capacity), plan.index)
  return plan.load
end
local STRATEGY_LETTERS = {
  slot = 'S', least_loaded = 'L', two_choices = 'T', weighted = 'W', round_robin = 'R',
}
local STRATEGY_NAMES = { 'slot', 'least_loaded', 'two_choices', 'weighted', 'round_robin' }

local function unhex(digits)
  return (string.gsub(digits, '%x%x', function(pair)
    return string.char(tonumber(pair, 16))
  end))
end

-- Whether a worker of node `node_hex` blocks now (its deadline in K_WAITERS is after now_ms).
-- Reads only (ZSCORE; with a waiter also the wake list's type): call it before the first write,
-- wake_node() after the writes. Every key is in KEYS: the wake-up of the node chosen inside a
-- script goes through the queue's one wake list, whatever the node.
local function node_waits(node_hex, now_ms)
  local deadline = read('ZSCORE', K_WAITERS, node_hex)
  if not deadline or tonumber(deadline) <= now_ms then
    return false
  end
  read('LLEN', K_WAKE)
  return true
end

-- Pushes `count` signals naming node `node_hex` on the queue's wake list (after node_waits()
-- said a worker of it blocks; cannot fail then).
local function wake_node(node_hex, count)
  push_wake(K_WAKE, count, node_hex)
end

-- Members of d:ready and d:assigned, and the lex range of one node's members.
local function ready_member(node_hex, score, task_id)
  return node_hex .. ':' .. string.format('%016d', score) .. task_id
end

local function assigned_member(node_hex, task_id)
  return node_hex .. ':' .. task_id
end

-- The route of a task ("n"..id), or CORRUPT.
local function parse_route(raw, task_id)
  local cost, letter, node_hex = string.match(raw or '', '^(%d+) ([SLTWR]) (%x+)$')
  if not cost or #node_hex % 2 == 1 then
    fail('CORRUPT', 'task ' .. show(task_id) .. ' has a malformed route ' .. show(raw))
  end
  return { cost = tonumber(cost), letter = letter, node_hex = node_hex }
end

-- What giving a task's cost back to its node will write (nil: the node is not registered).
-- Reads only; release(plan) writes it.
local function route_release_plan(route)
  local index = read('HGET', K_INDEX, unhex(route.node_hex))
  return index and release_plan(index, route.cost) or nil
end

local function main()
  key_count(DISPATCH_KEY_COUNT)
  arg_count(8, 9)
  local task_id = arg_string(1, 'task_id', 1, MAX_TASK_ID_BYTES)
  local token = arg_int(2, 'token', 1, MAX_SAFE_INTEGER)
  local delay_ms = arg_int(3, 'delay_ms', -1, MAX_TTL_MS)
  local reason = arg_string(4, 'reason', 0, 4096)
  local backoff_base_ms = arg_int(5, 'backoff_base_ms', 0, MAX_TTL_MS)
  local backoff_max_ms = arg_int(6, 'backoff_max_ms', 0, MAX_TTL_MS)
  local request_id = arg_request_id(7)
  local request_ttl_ms = arg_int(8, 'request_ttl_ms', 1, MAX_REQUEST_TTL_MS)
  local mode = #ARGV == 9 and arg_int(9, 'mode', 0, 2) or 0
  local now_ms = server_now_ms()
  local record = recorded_request(request_id, 'node_nack')
  if record then
    return { record[2], record[3] }
  end
  local fields = read('HMGET', K_TASKS, 'm' .. task_id, 'n' .. task_id, 'seq')
  local meta = fields[1] and parse_meta(fields[1], task_id)
  if not meta or meta.state ~= 'L' or meta.token ~= token then
    fail('STALE', 'the lease of task ' .. show(task_id) .. ' with token ' .. decimal(token)
      .. ' is no longer held')
  end
  local route = parse_route(fields[2], task_id)
  local seq = stored_count_or_zero(fields[3], 'the seq field')
  read('ZSCORE', K_LEASED, task_id)
  read('ZCARD', K_ASSIGNED)

  local reply, plan, waits
  local member = assigned_member(route.node_hex, task_id)
  local extra = { 'r' .. task_id, reason }
  if mode == 1 then
    -- Given back uncharged: the lease's attempt is taken back and the last reason kept.
    meta.attempts = math.max(meta.attempts - 1, 0)
    delay_ms, extra = 0, {}
  end
  if mode == 2 or (mode == 0 and meta.attempts >= meta.max_attempts) then
    read('ZCARD', K_DEAD)
    plan = route_release_plan(route)
    meta.state, meta.at_ms = 'X', now_ms
    reply = { 'dead', -1 }
    first_write('ZADD', K_DEAD, now_ms, task_id)
    redis.call('ZREM', K_ASSIGNED, member)
  else
    if delay_ms == -1 then
      -- 2^60 already exceeds any backoff_max_ms; base 0 means no backoff (never 0 * inf).
      local exponent = math.min(meta.attempts - 1, 60)
      delay_ms = backoff_base_ms == 0 and 0 or math.min(backoff_max_ms, backoff_base_ms * 2 ^ exponent)
    end
    -- A blocked worker of the node wakes (for a delayed retry too, as queue.nack does).
    waits = node_waits(route.node_hex, now_ms)
    if delay_ms == 0 then
      seq = seq + 1
      check_seq(seq)
      read('ZCARD', K_READY)
      meta.state, meta.at_ms = 'R', now_ms
      reply = { 'ready', 0 }
      first_write('ZADD', K_READY, 0, ready_member(route.node_hex, ready_score(meta.priority, seq), task_id))
      redis.call('ZREM', K_ASSIGNED, member)
      extra[#extra + 1], extra[#extra + 2] = 'seq', seq
    else
      -- Delayed: it stays assigned to its node (and in d:assigned).
      meta.state, meta.at_ms = 'D', now_ms + delay_ms
      reply = { 'delayed', delay_ms }
      first_write('ZADD', K_DELAYED, meta.at_ms, task_id)
    end
  end
  redis.call('ZREM', K_LEASED, task_id)
  redis.call('HSET', K_TASKS, 'm' .. task_id, format_meta(meta), unpack(extra))
  if plan then
    release(plan)
  end
  if waits then
    wake_node(route.node_hex, 1)
  end
  record_request(request_id, request_ttl_ms, { 'node_nack', reply[1], reply[2] })
  return reply
end

return run(main)
