--@script     pick.least_loaded
--@summary    Picks the live, non-draining node with the lowest utilization (load / capacity) that has room
--@+          for `cost`, and charges it `cost` in the same step, so two callers never both take a node's last
--@+          unit. Ties at the lowest utilization are broken uniformly with the client's random integer.
--@+          Unlimited nodes count as capacity 2^50. Give the load back with pick.release.
--@key        util        zset    luasched:{ns}:pick:util -- registered, non-draining indexes scored by
--@+          utilization load/capacity.
--@key        load        hash    luasched:{ns}:pick:load -- index -> current load (absent: 0).
--@key        capacity    hash    luasched:{ns}:nodes:capacity -- index -> capacity (absent: unlimited).
--@key        deadline    zset    luasched:{ns}:nodes:deadline -- index scored by its heartbeat deadline
--@+          (server ms); live while deadline > now.
--@key        node_id     hash    luasched:{ns}:nodes:id -- index -> node id.
--@arg        cost    int:1..1000000000000  The load to charge to the chosen node.
--@arg        random  int:0..9007199254740991  A uniformly random integer drawn by the client
--@+          (breaks ties).
--@reply      array{node_id:string, load:int, capacity:int}  The chosen node, its load after the charge, its
--@+          capacity (-1: unlimited).
--@error      ARG  Not 5 keys or 2 arguments, or an argument out of its range.
--@error      NONODE  No node is live and not draining; nothing changed.
--@error      ATCAPACITY  Every live, non-draining node is at its capacity for `cost`; nothing changed.
--@error      SCANLIMIT  The 128 least-utilized candidates were dead (not swept yet)
--@+          or had no room for `cost`; nothing changed.
--@error      CORRUPT  A key holds another type or shape than the layout; nothing changed.
--@complexity O(log n) for n eligible nodes; O(k log n) when the first k candidates are dead or too full for
--@+          the cost (k <= 128)
--@since      6.2

-- The lean path: the common pick (the lowest-utilized node is live and has room), made before
-- the helpers below are defined: defining them (a closure each, on every call) cost a quarter of
-- the script's server instructions (docs/redis-notes.md). It takes the decision main() takes --
-- the same lowest score, the same rank inside a tie (random mod tie size), the same fit and the
-- same writes (tests/test_pick.py runs both paths on equal states and compares replies and keys)
-- -- and only when every argument is one main() accepts (a subset: no leading zero in cost) and
-- every read is of the layout's type and shape; anything else (an error reply, a dead or full
-- node, an empty set) goes on to main(), which answers it, with LEAN_NOW_MS (TIME once per call).
-- Reads come first (redis.pcall: a wrong type gives an error table, never a raise); the two
-- writes last, on keys just read with their types checked, so they cannot fail.
local LEAN_NOW_MS = nil
if #KEYS == 5 and #ARGV == 2 then
  local cost_raw, random_raw = ARGV[1], ARGV[2]
  if #cost_raw <= 13 and #random_raw <= 16 and string.find(cost_raw, '^[1-9]%d*$')
    and string.find(random_raw, '^%d+$') and tonumber(cost_raw) <= 1000000000000
    and tonumber(random_raw) <= 9007199254740991 then
    local time = redis.call('TIME')
    local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    LEAN_NOW_MS = now_ms
    local head = redis.pcall('ZRANGE', KEYS[1], '0', '1', 'WITHSCORES')
    local lowest = head[2]
    local index = head[1]
    if type(lowest) == 'string' and tonumber(lowest) < 1 and head[4] == lowest then
      local ties = redis.pcall('ZCOUNT', KEYS[1], lowest, lowest)
      local rank = math.fmod(tonumber(random_raw), ties)
      if rank >= 2 then
        index = redis.pcall('ZRANGE', KEYS[1], rank, rank)[1]
      else
        index = head[2 * rank + 1]
      end
    end
    if type(lowest) == 'string' and tonumber(lowest) < 1 and type(index) == 'string' then
      local deadline = redis.pcall('ZSCORE', KEYS[4], index)
      local load_raw = redis.pcall('HGET', KEYS[2], index)
      local capacity_raw = redis.pcall('HGET', KEYS[3], index)
      local node_id = redis.pcall('HGET', KEYS[5], index)
      local capacity = capacity_raw == false and 1125899906842624
        or (type(capacity_raw) == 'string' and tonumber(capacity_raw))
      if type(deadline) == 'string' and tonumber(deadline) > now_ms and type(node_id) == 'string'
        and node_id ~= '' and capacity
        and (load_raw == false or (type(load_raw) == 'string' and #load_raw <= 16
          and string.find(load_raw, '^%d+$'))) then
        local new_load = (load_raw and tonumber(load_raw) or 0) + tonumber(cost_raw)
        if new_load <= capacity and capacity > 0 then
          redis.call('HSET', KEYS[2], index, string.format('%.0f', new_load))
          redis.call('ZADD', KEYS[1], 'XX', string.format('%.17g', new_load / capacity), index)
          return { node_id, new_load, capacity_raw and capacity or -1 }
        end
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
local SCRIPT_NAME = 'pick.least_loaded'
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
    local layout, culprit = { 'zset', 'hash', 'hash', 'zset', 'hash' }, 'a key'
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
-- An integer counter or load stored as a string (absent: 0); CORRUPT if it is not one.
local function stored_int(raw, what)
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
local function is_live(deadline_key, index, now_ms)
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
local K_UTIL, K_LOAD, K_CAPACITY, K_DEADLINE, K_ID = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

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
  local load = stored_int(read('HGET', K_LOAD, index), 'pick:load')
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
  if not is_live(K_DEADLINE, index, now_ms) then
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

local function main()
  key_count(5)
  arg_count(2, 2)
  local cost = arg_int(1, 'cost', 1, 1000000000000)
  local random = arg_int(2, 'random', 0, MAX_RANDOM)
  return pick_least_loaded(cost, random, LEAN_NOW_MS or server_now_ms())
end

return run(main)
