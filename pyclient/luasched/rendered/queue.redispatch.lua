--@script     queue.redispatch
--@summary    Moves up to `limit` tasks off a node that is dead, draining or no longer registered, to nodes chosen
--@+          again with each task's own strategy (slot-routed tasks go to the live owner of their routing key's slot):
--@+          its ready tasks first, then its leased ones (the lease is revoked: the old token is refused from now on,
--@+          the task is ready on the new node, its attempts kept) and its delayed ones (still delayed, on the new
--@+          node). Each move gives the cost back to the old node (if still registered) and charges the new one. A
--@+          live, non-draining node is left alone (reply state "live"). Bounded: call again while `more` is 1.
--@+          If choosing a node fails for a task after others were moved, the call stops there, keeps those moves
--@+          and answers more = 1; if it fails for the first task, the call fails and nothing changed.
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
--@arg        node_id  string:1..1024  The node whose tasks move.
--@arg        limit    int:1..100  Most tasks moved by this call.
--@arg        seed     int:0..9007199254740991  A random integer drawn by the client; the picks' random integers
--@+          are drawn from it (a MINSTD sequence), never from math.random.
--@reply      array{moved:int, more:int:0..1, state:string}  moved tasks; more = 1 if the node has tasks left (call
--@+          again); state of the node: "dead", "draining", "absent" (not registered) or "live" (nothing moved).
--@error      ARG  Not 21 keys or 3 arguments, or an argument out of its range.
--@error      NONODE  No live, non-draining node for the first task (for slot: its slot has no live owner other than
--@+          the node itself); nothing changed.
--@error      ATCAPACITY  least_loaded / two_choices: every live node is full for the first task's cost; nothing changed.
--@error      SCANLIMIT  The pick's bounded walk met only dead or too-full nodes for the first task; nothing changed.
--@error      CORRUPT  A key holds another type or shape than the layout; nothing changed.
--@complexity O(limit (log n + pick)) for n tasks
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
        return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[1] must start with luasched:{<namespace>}: (a namespace of at least one byte, without { or })')
      end
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[1] must be luasched:{ns}:d:ready:<queue> in the namespace of KEYS[1]')
    end
    local plen = #prefix
    local key
    key = keys[2]
    if key and key ~= prefix .. 'd:delayed:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[2] must be luasched:{ns}:d:delayed:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[3]
    if key and key ~= prefix .. 'd:leased:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[3] must be luasched:{ns}:d:leased:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[4]
    if key and key ~= prefix .. 'd:dead:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[4] must be luasched:{ns}:d:dead:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[5]
    if key and key ~= prefix .. 'd:tasks:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[5] must be luasched:{ns}:d:tasks:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[6]
    if key and key ~= prefix .. 'd:assigned:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[6] must be luasched:{ns}:d:assigned:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[7]
    if key and (sub(key, 1, plen) ~= prefix or sub(key, plen + 1, plen + 6) ~= 'd:req:') then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[7] must be luasched:{ns}:d:req:<request_id>:<queue> in the namespace of KEYS[1]')
    end
    key = keys[8]
    if key and key ~= prefix .. 'nodes:index' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[8] must be luasched:{ns}:nodes:index in the namespace of KEYS[1]')
    end
    key = keys[9]
    if key and key ~= prefix .. 'nodes:id' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[9] must be luasched:{ns}:nodes:id in the namespace of KEYS[1]')
    end
    key = keys[10]
    if key and key ~= prefix .. 'nodes:weight' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[10] must be luasched:{ns}:nodes:weight in the namespace of KEYS[1]')
    end
    key = keys[11]
    if key and key ~= prefix .. 'nodes:capacity' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[11] must be luasched:{ns}:nodes:capacity in the namespace of KEYS[1]')
    end
    key = keys[12]
    if key and key ~= prefix .. 'nodes:deadline' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[12] must be luasched:{ns}:nodes:deadline in the namespace of KEYS[1]')
    end
    key = keys[13]
    if key and key ~= prefix .. 'nodes:draining' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[13] must be luasched:{ns}:nodes:draining in the namespace of KEYS[1]')
    end
    key = keys[14]
    if key and key ~= prefix .. 'slots:owner' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[14] must be luasched:{ns}:slots:owner in the namespace of KEYS[1]')
    end
    key = keys[15]
    if key and key ~= prefix .. 'pick:load' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[15] must be luasched:{ns}:pick:load in the namespace of KEYS[1]')
    end
    key = keys[16]
    if key and key ~= prefix .. 'pick:util' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[16] must be luasched:{ns}:pick:util in the namespace of KEYS[1]')
    end
    key = keys[17]
    if key and key ~= prefix .. 'pick:ring' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[17] must be luasched:{ns}:pick:ring in the namespace of KEYS[1]')
    end
    key = keys[18]
    if key and key ~= prefix .. 'pick:state' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[18] must be luasched:{ns}:pick:state in the namespace of KEYS[1]')
    end
    key = keys[19]
    if key and key ~= prefix .. 'pick:weighted' then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[19] must be luasched:{ns}:pick:weighted in the namespace of KEYS[1]')
    end
    key = keys[20]
    if key and key ~= prefix .. 'd:wake:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[20] must be luasched:{ns}:d:wake:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
    end
    key = keys[21]
    if key and key ~= prefix .. 'd:waiters:' .. tail_queue then
      return redis.error_reply('LUASCHED_ARG queue.redispatch: KEYS[21] must be luasched:{ns}:d:waiters:<queue> in the namespace of KEYS[1], naming what KEYS[1] names')
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
local SCRIPT_NAME = 'queue.redispatch'
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

-- Whether `index` (a member string) is live at now_ms.
local function node_is_live(deadline_key, index, now_ms)
  local deadline = read('ZSCORE', deadline_key, index)
  return deadline and tonumber(deadline) > now_ms
end

-- The node id of `index` in the nodes:id hash `id_key`; CORRUPT if the registry lost it.
local function node_id_of(id_key, index)
  local node_id = read('HGET', id_key, index)
  if not node_id then
    fail('CORRUPT', 'index ' .. show(index) .. ' has no node id')
  end
  return node_id
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

-- Charges `cost` to `index` and answers {node_id, load, capacity (-1: unlimited)}. Reads the
-- node id first unless the caller passes it (a caller that has written already must: no read
-- after the first write); its writes come last and cannot fail (both keys were read by
-- load_and_capacity).
local function charge(index, load, capacity, capacity_raw, cost, known_node_id)
  local node_id = known_node_id or node_id_of(K_ID, index)
  if before_charge then
    before_charge(node_id)
  end
  local new_load = load + cost
  redis.call('HSET', K_LOAD, index, decimal(new_load))
  redis.call('ZADD', K_UTIL, 'XX', utilization_score(new_load, capacity), index)
  return { node_id, new_load, capacity_raw and capacity or -1 }
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

-- A node id as lowercase hex (no ":" in it), and back.
local function hex(raw)
  return (string.gsub(raw, '.', function(char)
    return string.format('%02x', string.byte(char))
  end))
end

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

local function node_range(node_hex)
  return '[' .. node_hex .. ':', '(' .. node_hex .. ';'
end

-- The route of a task ("n"..id), or CORRUPT.
local function parse_route(raw, task_id)
  local cost, letter, node_hex = string.match(raw or '', '^(%d+) ([SLTWR]) (%x+)$')
  if not cost or #node_hex % 2 == 1 then
    fail('CORRUPT', 'task ' .. show(task_id) .. ' has a malformed route ' .. show(raw))
  end
  return { cost = tonumber(cost), letter = letter, node_hex = node_hex }
end

local function format_route(route)
  return string.format('%d %s %s', route.cost, route.letter, route.node_hex)
end

-- What giving a task's cost back to its node will write (nil: the node is not registered).
-- Reads only; release(plan) writes it.
local function route_release_plan(route)
  local index = read('HGET', K_INDEX, unhex(route.node_hex))
  return index and release_plan(index, route.cost) or nil
end

-- ---------------------------------------------------------------------------------------------
-- dispatch_pick (lua/include/dispatch_pick.lua.j2): choosing a node for a dispatched task with
-- the very picks of lua/pick/ (include/pick_*.lua.j2) and slots.owner (include/lookup.lua.j2),
-- for queue.dispatch, queue.redispatch and queue.dispatch_requeue_dead. Needs
-- include/dispatch.lua.j2 (its KEYS bindings).
-- ---------------------------------------------------------------------------------------------
-- ---------------------------------------------------------------------------------------------
-- pick_walk (lua/include/pick_walk.lua.j2): a bounded walk over a candidate zset that skips dead
-- nodes. Needs prelude.lua.j2 and pick.lua.j2. Candidate sets keep dead nodes until nodes.sweep,
-- so a walk examines at most SCAN_LIMIT (128) members and then fails with
-- SCANLIMIT (before any write) rather than run unbounded.
-- ---------------------------------------------------------------------------------------------
local SCAN_LIMIT = 128

-- Walks the zset `key` of indexes in rank order from rank `first` (wrapping past the end to
-- rank 0 when `wrap`), examining at most SCAN_LIMIT members and each member at most once.
-- For each live member calls accept(member, score): true takes it, 'stop' ends the walk.
-- Returns member, score of the taken one; or nil and why: 'end' (every member examined),
-- 'stop', or 'limit' (SCAN_LIMIT examined). Also returns how many live members it saw.
-- O(examined * log n): ZRANGE and ZMSCORE in growing chunks.
local function walk(key, deadline_key, now_ms, first, wrap, accept)
  local total = read('ZCARD', key)
  local budget = math.min(total, SCAN_LIMIT)
  local examined, live_seen, rank, chunk = 0, 0, first, 4
  while examined < budget do
    if rank >= total then
      if not wrap or first == 0 then
        break
      end
      rank = 0
    end
    local size = math.min(chunk, budget - examined, total - rank)
    if wrap and rank < first then
      size = math.min(size, first - rank)
    end
    local flat = read('ZRANGE', key, rank, rank + size - 1, 'WITHSCORES')
    local count = #flat / 2
    if count == 0 then
      break
    end
    local members = {}
    for position = 1, count do
      members[position] = flat[2 * position - 1]
    end
    local deadlines = read('ZMSCORE', deadline_key, unpack(members))
    for position = 1, count do
      examined = examined + 1
      local deadline = deadlines[position]
      if deadline and tonumber(deadline) > now_ms then
        live_seen = live_seen + 1
        local score = tonumber(flat[2 * position])
        local verdict = accept(members[position], score)
        if verdict == 'stop' then
          return nil, 'stop', live_seen
        elseif verdict then
          return members[position], score, live_seen
        end
      end
    end
    rank = rank + count
    chunk = chunk * 2
  end
  if examined >= SCAN_LIMIT and examined < total then
    return nil, 'limit', live_seen
  end
  return nil, 'end', live_seen
end


-- Fails for a walk of a strategy without capacity that took nothing: SCANLIMIT or NONODE.
local function fail_no_live(why)
  if why == 'limit' then
    fail('SCANLIMIT', 'the first ' .. SCAN_LIMIT .. ' candidates were all dead; sweep dead nodes')
  end
  fail('NONODE', 'no live node that is not draining')
end
-- ---------------------------------------------------------------------------------------------
-- pick_load (lua/include/pick_load.lua.j2): capacity-aware picks (pick.least_loaded and
-- pick.two_choices, and queue.dispatch with those strategies). Needs prelude, pick_score, pick,
-- pick_walk and pick_charge. The includer binds K_UTIL, K_LOAD, K_CAPACITY, K_DEADLINE, K_ID
-- (the keys of include/pick_load_keys.j2).
--
-- Least-loaded: the live member of pick:util with the lowest utilization that has room for
-- the cost. Fast path (no dead node, no cost problem): ZRANGE 0 1 tells whether the lowest
-- score is shared; if so ZCOUNT gives the tie size and the client's random integer picks a rank
-- inside the tie (uniform). Otherwise a bounded walk in utilization order skips dead nodes and
-- nodes without room for the cost, and stops at the first live node whose score is >= 1 (full
-- for any cost: every later one is too, see pick_score). Charging writes the load (pick:load)
-- and the new score (pick:util), nothing else.
-- ---------------------------------------------------------------------------------------------

-- The candidate `index` if it is live and has room for `cost`: its load and capacities.
local function fits(index, cost, now_ms)
  if not node_is_live(K_DEADLINE, index, now_ms) then
    return nil
  end
  local load, capacity, capacity_raw = load_and_capacity(index)
  if load + cost > capacity then
    return nil
  end
  return load, capacity, capacity_raw
end

-- The least-loaded pick: see the header. Fails NONODE, ATCAPACITY or SCANLIMIT.
local function pick_least_loaded(cost, random, now_ms)
  -- Ranks as strings: a number argument to redis.call is formatted with snprintf.
  local head = read('ZRANGE', K_UTIL, '0', '1', 'WITHSCORES')
  if #head == 0 then
    fail('NONODE', 'no live node that is not draining')
  end
  local index = head[1]
  if tonumber(head[2]) < 1 then
    if head[4] == head[2] then
      -- A tie at the lowest score (equal scores have equal '%.17g' strings). Ranks 0 and 1
      -- are the two members the ZRANGE above answered; others take one more ZRANGE.
      local ties = read('ZCOUNT', K_UTIL, head[2], head[2])
      local rank = fmod(random, ties)
      if rank < 2 then
        index = head[2 * rank + 1]
      else
        index = read('ZRANGE', K_UTIL, rank, rank)[1]
      end
    end
    local load, capacity, capacity_raw = fits(index, cost, now_ms)
    if load then
      return charge(index, load, capacity, capacity_raw, cost)
    end
  end
  local found_load, found_capacity, found_raw
  local member, why, live_seen = walk(K_UTIL, K_DEADLINE, now_ms, 0, false, function(candidate, score)
    if score >= 1 then
      return 'stop'
    end
    local load, capacity, capacity_raw = load_and_capacity(candidate)
    if load + cost <= capacity then
      found_load, found_capacity, found_raw = load, capacity, capacity_raw
      return true
    end
    return false
  end)
  if member then
    return charge(member, found_load, found_capacity, found_raw, cost)
  end
  if why == 'limit' then
    fail('SCANLIMIT', 'the first ' .. SCAN_LIMIT .. ' candidates were dead or had no room for cost '
      .. decimal(cost) .. ' (' .. live_seen .. ' live); sweep dead nodes or lower the cost')
  end
  if why == 'stop' or live_seen > 0 then
    fail('ATCAPACITY', 'every live node is at its capacity for cost ' .. decimal(cost))
  end
  fail('NONODE', 'no live node that is not draining')
end

-- Power of two choices: two distinct ranks of pick:util from random1 and random2; the less
-- utilized (the first drawn on a tie) that is live and has room is charged; if neither is, the
-- least-loaded pick (ties broken with random3). Fails as pick_least_loaded.
local function pick_two_choices(cost, random1, random2, random3, now_ms)
  local count = read('ZCARD', K_UTIL)
  if count == 0 then
    fail('NONODE', 'no live node that is not draining')
  end
  -- Two distinct ranks, uniform over the pairs: the second skips the first.
  local first_rank = fmod(random1, count)
  local second_rank = first_rank
  if count > 1 then
    second_rank = fmod(first_rank + 1 + fmod(random2, count - 1), count)
  end
  local first = read('ZRANGE', K_UTIL, first_rank, first_rank, 'WITHSCORES')
  local second = read('ZRANGE', K_UTIL, second_rank, second_rank, 'WITHSCORES')
  local candidates = { first[1], second[1] }
  if tonumber(second[2]) < tonumber(first[2]) then
    candidates = { second[1], first[1] }
  end
  for position = 1, (count > 1 and 2 or 1) do
    local index = candidates[position]
    local load, capacity, capacity_raw = fits(index, cost, now_ms)
    if load then
      return charge(index, load, capacity, capacity_raw, cost)
    end
  end
  return pick_least_loaded(cost, random3, now_ms)
end
-- ---------------------------------------------------------------------------------------------
-- pick_eligible (lua/include/pick_eligible.lua.j2): the live, non-draining nodes and their
-- weights, read in full (O(n log n)). Needs prelude and pick. Used where a strategy needs every
-- candidate: pick.weighted when it rebuilds its table, pick.smooth_weighted on every pick.
-- ---------------------------------------------------------------------------------------------

-- Indexes (numbers, ascending) of the live, non-draining nodes, and their weights (numbers).
local function eligible_weights(deadline_key, draining_key, weight_key, now_ms)
  local live = read('ZRANGEBYSCORE', deadline_key, '(' .. decimal(now_ms), '+inf')
  local draining = {}
  for _, member in ipairs(read('SMEMBERS', draining_key)) do
    draining[member] = true
  end
  local indexes = {}
  for _, member in ipairs(live) do
    if not draining[member] then
      indexes[#indexes + 1] = tonumber(member)
    end
  end
  table.sort(indexes)
  local weights = {}
  for first = 1, #indexes, 1000 do
    local last = math.min(first + 999, #indexes)
    local chunk = read('HMGET', weight_key, unpack(indexes, first, last))
    for offset = 1, last - first + 1 do
      -- A registered index always has a weight (registry invariant).
      local weight = tonumber(chunk[offset])
      if not weight or weight < 1 or weight ~= math.floor(weight) then
        fail('CORRUPT', 'index ' .. indexes[first + offset - 1] .. ' has weight ' .. show(chunk[offset]))
      end
      weights[first + offset - 1] = weight
    end
  end
  return indexes, weights
end
-- ---------------------------------------------------------------------------------------------
-- pick_weighted (lua/include/pick_weighted.lua.j2): the weighted random pick, shared by
-- pick.weighted and queue.dispatch. Needs prelude, pick and pick_eligible; the includer binds
-- K_WEIGHTED (pick:weighted), K_DEADLINE, K_DRAINING, K_WEIGHT, K_ID (nodes:*).
--
-- pick:weighted holds the live eligible indexes scored by cumulative weight; the pick is the
-- first member whose cumulative weight exceeds random1 mod total (node i covers
-- [cumulative(i-1), cumulative(i))). When the table is absent, or the draw lands on a node that
-- died since it was built, it is rebuilt (O(n log n)) and the draw is made again with random2,
-- so the probability stays exactly weight / total over the live nodes.
-- ---------------------------------------------------------------------------------------------

-- Picks (reads only): answers the node id, its index (a member string) and the rebuilt table
-- (nil when the stored one was used), which weighted_commit() writes. Fails NONODE.
local function pick_weighted(random1, random2, now_ms)
  local top = read('ZRANGE', K_WEIGHTED, -1, -1, 'WITHSCORES')
  if #top == 2 then
    local draw = fmod(random1, tonumber(top[2]))
    local member = read('ZRANGEBYSCORE', K_WEIGHTED, '(' .. decimal(draw), '+inf',
      'LIMIT', 0, 1)[1]
    if node_is_live(K_DEADLINE, member, now_ms) then
      return node_id_of(K_ID, member), member
    end
  end

  -- Rebuild from the live, non-draining nodes (all reads first), then draw with random2.
  local indexes, weights = eligible_weights(K_DEADLINE, K_DRAINING, K_WEIGHT, now_ms)
  if #indexes == 0 then
    fail('NONODE', 'no live node that is not draining')
  end
  local cumulative, total = {}, 0
  for position = 1, #indexes do
    -- total <= 65535000000 < 2^53: exact.
    total = total + weights[position]
    cumulative[position] = total
  end
  local draw = fmod(random2, total)
  local low, high = 1, #indexes
  while low < high do
    local middle = math.floor((low + high) / 2)
    if cumulative[middle] > draw then
      high = middle
    else
      low = middle + 1
    end
  end
  return node_id_of(K_ID, indexes[low]), decimal(indexes[low]), { indexes, cumulative }
end

-- Writes the table pick_weighted rebuilt (pick:weighted was read there). Cannot fail.
local function weighted_commit(rebuilt)
  if not rebuilt then
    return
  end
  local indexes, cumulative = rebuilt[1], rebuilt[2]
  redis.call('DEL', K_WEIGHTED)
  for first = 1, #indexes, 1000 do
    local arguments = {}
    for position = first, math.min(first + 999, #indexes) do
      arguments[#arguments + 1] = cumulative[position]
      arguments[#arguments + 1] = indexes[position]
    end
    redis.call('ZADD', K_WEIGHTED, unpack(arguments))
  end
end
-- ---------------------------------------------------------------------------------------------
-- pick_round_robin (lua/include/pick_round_robin.lua.j2): the round-robin pick, shared by
-- pick.round_robin and queue.dispatch. Needs prelude, pick and pick_walk; the includer binds
-- K_RING (pick:ring), K_STATE (pick:state), K_DEADLINE (nodes:deadline), K_ID (nodes:id).
--
-- The next live member of pick:ring after the cursor (the index of the last pick), wrapping;
-- the cursor moves to it. The cursor is an index, not a rank, so a join or leave changes only
-- that node's own turns.
-- ---------------------------------------------------------------------------------------------

-- Picks (reads only): answers the node id and its index (a member string). Then
-- round_robin_commit(index) moves the cursor. Fails NONODE or SCANLIMIT.
local function pick_round_robin(now_ms)
  local cursor = stored_count_or_zero(read('HGET', K_STATE, 'cursor'), 'pick:state cursor')
  -- The rank of the first member after the cursor (indexes are their own scores).
  local first = read('ZCOUNT', K_RING, '-inf', decimal(cursor))
  local member, why = walk(K_RING, K_DEADLINE, now_ms, first, true, function()
    return true
  end)
  if not member then
    fail_no_live(why)
  end
  local node_id = read('HGET', K_ID, member)
  if not node_id then
    fail('CORRUPT', 'index ' .. show(member) .. ' of pick:ring has no node id')
  end
  return node_id, member
end

-- The pick's one write: the cursor (pick:state was read by pick_round_robin). Cannot fail.
local function round_robin_commit(member)
  redis.call('HSET', K_STATE, 'cursor', member)
end
-- ---------------------------------------------------------------------------------------------
-- crc16 (lua/include/crc16.lua.j2): the Redis Cluster key slot of a key.
--
-- CRC-16/XMODEM (polynomial 0x1021, initial value 0) of the key, or of its hash tag when the key
-- has one: the bytes between the first "{" and the first "}" after it, if there is at least one
-- byte between them. slot = crc % 16384. The 256-entry table is generated by the renderer as one
-- 512-byte string constant (entry i, 0-based, is bytes 2i+1 and 2i+2, big-endian): a string is
-- created once when the script is compiled, whereas a table constructor runs on every call
-- (~2 us for 256 entries).
-- ---------------------------------------------------------------------------------------------
local CRC16_TABLE =
'\0\0\16\33\32\66\48\99\64\132\80\165\96\198\112\231\129\8\145\41\161\74\177\107\193\140\209\173\225\206\241\239\18\49\2\16\50\115\34\82\82\181\66\148\114\247\98\214\147\57\131\24\179\123\163\90\211\189\195\156\243\255\227\222\36\98\52\67\4\32\20\1\100\230\116\199\68\164\84\133\165\106\181\75\133\40\149\9\229\238\245\207\197\172\213\141\54\83\38\114\22\17\6\48\118\215\102\246\86\149\70\180\183\91\167\122\151\25\135\56\247\223\231\254\215\157\199\188\72\196\88\229\104\134\120\167\8\64\24\97\40\2\56\35\201\204\217\237\233\142\249\175\137\72\153\105\169\10\185\43\90\245\74\212\122\183\106\150\26\113\10\80\58\51\42\18\219\253\203\220\251\191\235\158\155\121\139\88\187\59\171\26\108\166\124\135\76\228\92\197\44\34\60\3\12\96\28\65\237\174\253\143\205\236\221\205\173\42\189\11\141\104\157\73\126\151\110\182\94\213\78\244\62\19\46\50\30\81\14\112\255\159\239\190\223\221\207\252\191\27\175\58\159\89\143\120\145\136\129\169\177\202\161\235\209\12\193\45\241\78\225\111\16\128\0\161\48\194\32\227\80\4\64\37\112\70\96\103\131\185\147\152\163\251\179\218\195\61\211\28\227\127\243\94\2\177\18\144\34\243\50\210\66\53\82\20\98\119\114\86\181\234\165\203\149\168\133\137\245\110\229\79\213\44\197\13\52\226\36\195\20\160\4\129\116\102\100\71\84\36\68\5\167\219\183\250\135\153\151\184\231\95\247\126\199\29\215\60\38\211\54\242\6\145\22\176\102\87\118\118\70\21\86\52\217\76\201\109\249\14\233\47\153\200\137\233\185\138\169\171\88\68\72\101\120\6\104\39\24\192\8\225\56\130\40\163\203\125\219\92\235\63\251\30\139\249\155\216\171\187\187\154\74\117\90\84\106\55\122\22\10\241\26\208\42\179\58\146\253\46\237\15\221\108\205\77\189\170\173\139\157\232\141\201\124\38\108\7\92\100\76\69\60\162\44\131\28\224\12\193\239\31\255\62\207\93\223\124\175\155\191\186\143\217\159\248\110\23\126\54\78\85\94\116\46\147\62\178\14\209\30\240'

local function key_slot(key)
  local open = string.find(key, '{', 1, true)
  if open then
    local close = string.find(key, '}', open + 1, true)
    if close and close > open + 1 then
      key = string.sub(key, open + 1, close - 1)
    end
  end
  local bxor, band, lshift, rshift, byte = bit.bxor, bit.band, bit.lshift, bit.rshift, string.byte
  local crc = 0
  for position = 1, #key do
    -- Entry index = (high byte of crc) xor (next byte of the key).
    local entry = bxor(rshift(crc, 8), byte(key, position)) * 2
    local high, low = byte(CRC16_TABLE, entry + 1, entry + 2)
    crc = bxor(band(lshift(crc, 8), 0xffff), high * 256 + low)
  end
  return band(crc, 0x3fff)
end
-- ---------------------------------------------------------------------------------------------
-- lookup (lua/include/lookup.lua.j2): the live owner of a slot. Needs include/registry.lua.j2.
--
-- Semantics shared by slots.owner, slots.owners and slots.owner_of_slot: a lookup never answers
-- a node that is not live. A slot that has no owner in the table, or whose owner's deadline has
-- lapsed (dead, not yet swept), has no live owner: its entry is {slot, 0, ""}. A lookup does
-- not fall through to another node (that node would change again at the next rebalance, and
-- two lookups with no write between them could disagree as time passes); the caller retries
-- after nodes.sweep or slots.rebalance. When no node at all is live, the call fails with
-- NONODE instead, since no rebalance could help. O(1) per slot (GETRANGE, ZSCORE, HGET).
-- ---------------------------------------------------------------------------------------------

-- The node id of the live owner of `slot` (0-based) and its index (a number), or nil.
local function live_owner(slot, now_ms)
  local pair = redis.call('GETRANGE', K_SLOTS, slot * 2, slot * 2 + 1)
  if #pair < 2 then
    return nil
  end
  local index = string.byte(pair, 1) * 256 + string.byte(pair, 2)
  if index == 0 then
    return nil
  end
  local deadline = redis.call('ZSCORE', K_DEADLINE, index)
  -- ZSCORE answers "inf" for a node without deadline; tonumber reads it as infinity.
  if not deadline or tonumber(deadline) <= now_ms then
    return nil
  end
  local node_id = redis.call('HGET', K_ID, index)
  if not node_id then
    return nil
  end
  return node_id, index
end

-- The random integers of a call that takes one client seed (queue.redispatch,
-- queue.dispatch_requeue_dead), never math.random: a function that answers the next integer in
-- 0..2^53-1 of the seed's sequence at each call, from two MINSTD (Park-Miller) steps (31 + 22
-- bits). Exact in doubles: state < 2^31, state * 48271 < 2^47.
local function seeded_draws(seed)
  local modulus = 2147483647
  local state = fmod(seed, modulus - 1) + 1
  return function()
    state = fmod(state * 48271, modulus)
    local high = state
    state = fmod(state * 48271, modulus)
    return high * 4194304 + fmod(state, 4194304)
  end
end

-- What the last choose_and_charge() chose: hex(node id) and whether a worker of it blocks, both
-- set by charge() before its first write (before_charge), at the server time chosen_now_ms.
local chosen_hex, chosen_waits, chosen_now_ms = nil, false, 0
local function note_chosen(node_id)
  chosen_hex = hex(node_id)
  chosen_waits = node_waits(chosen_hex, chosen_now_ms)
end

-- Chooses a node by strategy letter (S: the live owner of routing_key's slot) and charges it
-- `cost`. Reads first (the chosen node's waiter too); the charge and the pick's own writes come
-- last. Answers the node id, its hex, and whether a worker of it blocks (then the caller calls
-- wake_node after its writes). S, W and R charge without a capacity check (only L and T respect
-- capacities). `exclude`: a node id a slot owner must not be (redispatch away from a draining
-- owner: NONODE).
local function choose_and_charge(letter, routing_key, cost, random1, random2, random3, now_ms,
                                 exclude)
  before_charge = note_chosen
  chosen_now_ms = now_ms
  if letter == 'L' then
    local node_id = pick_least_loaded(cost, random1, now_ms)[1]
    return node_id, chosen_hex, chosen_waits
  elseif letter == 'T' then
    local node_id = pick_two_choices(cost, random1, random2, random3, now_ms)[1]
    return node_id, chosen_hex, chosen_waits
  end
  local node_id, index, commit
  if letter == 'S' then
    local slot = key_slot(routing_key)
    node_id, index = live_owner(slot, now_ms)
    if not node_id or node_id == exclude then
      fail('NONODE', 'slot ' .. slot .. ' of the routing key has no live owner'
        .. (node_id and ' but the node itself' or '') .. '; run nodes.sweep or slots.rebalance')
    end
    index = decimal(index)
  elseif letter == 'W' then
    local rebuilt
    node_id, index, rebuilt = pick_weighted(random1, random2, now_ms)
    commit = function() weighted_commit(rebuilt) end
  else
    node_id, index = pick_round_robin(now_ms)
    commit = function() round_robin_commit(index) end
  end
  local load, capacity, capacity_raw = load_and_capacity(index)
  read('ZSCORE', K_UTIL, index)  -- its type, before the first write
  -- charge() first: its reads (before_charge) precede every write; the keys are independent.
  charge(index, load, capacity, capacity_raw, cost, node_id)  -- the pick read the node id
  if commit then
    commit()
  end
  return node_id, chosen_hex, chosen_waits
end

-- Moves the ready task `member` (its id, parsed route and slot routing key) off node
-- route.node_hex to a node chosen again with its own strategy, keeping its place (priority and
-- sequence number) in the new node's queue; gives the cost back to the old node (if still
-- registered) and charges the new one. Reads first (the release, the pick), then writes that
-- cannot fail: a pick that fails (NONODE, ATCAPACITY, SCANLIMIT) changes nothing. Answers the
-- new node's hex. `exclude` as in choose_and_charge.
local function move_ready(member, task_id, route, routing_key, draw, now_ms, exclude)
  local plan = route_release_plan(route)
  local _, new_hex, waits = choose_and_charge(route.letter, routing_key, route.cost, draw(), draw(),
    draw(), now_ms, exclude)
  if plan then
    release(plan)
  end
  local score = string.sub(member, #route.node_hex + 2, #route.node_hex + 17)
  redis.call('ZREM', K_READY, member)
  redis.call('ZADD', K_READY, 0, new_hex .. ':' .. score .. task_id)
  route.node_hex = new_hex
  redis.call('HSET', K_TASKS, 'n' .. task_id, format_route(route))
  -- A blocked worker of the new node wakes.
  if waits then
    wake_node(new_hex, 1)
  end
  return new_hex
end
local function main()
  key_count(DISPATCH_KEY_COUNT)
  arg_count(3, 3)
  local node_id = arg_string(1, 'node_id', 1, 1024)
  local limit = arg_int(2, 'limit', 1, 100)
  local seed = arg_int(3, 'seed', 0, MAX_RANDOM)
  local now_ms = server_now_ms()
  local draw = seeded_draws(seed)

  local index = read('HGET', K_INDEX, node_id)
  local state = 'absent'
  if index then
    local deadline = read('ZSCORE', K_DEADLINE, index)
    if read('SISMEMBER', K_DRAINING, index) == 1 then
      state = 'draining'
    elseif deadline and tonumber(deadline) > now_ms then
      return { 0, 0, 'live' }
    else
      state = 'dead'
    end
  end

  local node_hex = hex(node_id)
  local low, high = node_range(node_hex)
  local ready = read('ZRANGEBYLEX', K_READY, low, high, 'LIMIT', 0, limit + 1)
  local held = {}
  if #ready <= limit then
    held = read('ZRANGEBYLEX', K_ASSIGNED, low, high, 'LIMIT', 0, limit + 1 - #ready)
  end
  local more = #ready + #held > limit
  local entries = {}
  for position = 1, math.min(#ready, limit) do
    entries[#entries + 1] = { member = ready[position], id = string.sub(ready[position], #node_hex + 18),
      ready = true }
  end
  for position = 1, #held do
    if #entries < limit then
      entries[#entries + 1] = { member = held[position], id = string.sub(held[position], #node_hex + 2) }
    end
  end
  if #entries == 0 then
    return { 0, 0, state }
  end
  local fields = { 'seq' }
  for _, entry in ipairs(entries) do
    fields[#fields + 1] = 'm' .. entry.id
    fields[#fields + 1] = 'n' .. entry.id
    fields[#fields + 1] = 'k' .. entry.id
  end
  local values = read('HMGET', K_TASKS, unpack(fields))
  local seq = stored_count_or_zero(values[1], 'the seq field')
  read('ZCARD', K_LEASED)
  read('ZCARD', K_DELAYED)
  for position, entry in ipairs(entries) do
    entry.meta = existing_meta(values[3 * position - 1], entry.id)
    entry.route = parse_route(values[3 * position], entry.id)
    entry.key = values[3 * position + 1] or ''
  end

  -- One task: its reads (old node's release, the pick), then its writes, none of which can fail.
  local function move(entry)
    local route, meta, task_id = entry.route, entry.meta, entry.id
    if entry.ready then
      move_ready(entry.member, task_id, route, entry.key, draw, now_ms, node_id)
      return
    end
    local plan = route_release_plan(route)
    if meta.state == 'L' then
      -- A revoked lease queues again under a new sequence number: checked before the charge, so
      -- an exhausted seq fails this move before anything of it is written.
      seq = seq + 1
      check_seq(seq)
    end
    local _, new_hex, waits = choose_and_charge(route.letter, entry.key, route.cost, draw(), draw(),
      draw(), now_ms, node_id)
    if plan then
      release(plan)
    end
    if meta.state == 'L' then
      -- Revoked: ready on the new node (the old token no longer matches a leased state).
      meta.state, meta.at_ms = 'R', now_ms
      redis.call('ZREM', K_LEASED, task_id)
      redis.call('ZREM', K_ASSIGNED, entry.member)
      redis.call('ZADD', K_READY, 0, ready_member(new_hex, ready_score(meta.priority, seq), task_id))
      redis.call('HSET', K_TASKS, 'seq', seq)
    else
      redis.call('ZREM', K_ASSIGNED, entry.member)
      redis.call('ZADD', K_ASSIGNED, 0, assigned_member(new_hex, task_id))
    end
    route.node_hex = new_hex
    redis.call('HSET', K_TASKS, 'm' .. task_id, format_meta(meta), 'n' .. task_id, format_route(route))
    -- A blocked worker of the new node wakes (for a delayed task too: it may be due sooner).
    if waits then
      wake_node(new_hex, 1)
    end
  end

  local moved = 0
  for _, entry in ipairs(entries) do
    local ok, problem = pcall(move, entry)
    if not ok then
      if moved == 0 then
        error(problem, 0)
      end
      more = true
      break
    end
    moved = moved + 1
  end
  return { moved, more and 1 or 0, state }
end

return run(main)
