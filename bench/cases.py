"""The rows of the benchmark. Adding a row is a few lines: a worker factory and ``add(Case(...))``.

Groups (one report table each, ``--only GROUP``):

* ``floor``: ``PING``; ``EVALSHA`` of ``return 1`` (the floor every ratio refers to); and
  ``LEASE_SCRIPT`` below, the least work any atomic lease-based queue does per dequeue.
* ``slots``: ``slots.keyslot`` with 1 and with 100 keys per call.
* ``nodes``: ``slots.owner`` with 10 and 10,000 registered nodes; ``slots.rebalance`` over 1,000.
* ``locks``: luasched's lock (plain, with request ids, fair) and its peers (redis-py
  ``Lock``, python-redis-lock, pottery ``Redlock`` on one master): one uncontended acquire + one
  release per cycle. Under contention: bench/contention.py.
* ``pick``: ``least_loaded``, ``two_choices``, ``weighted``, ``least_recent`` over 10 and 10,000
  registered nodes.
* ``queue``: a task's whole life (enqueue + dequeue-and-lock + ack) against a bare three-script
  reference queue; dequeue with 1,000 / 100,000 / 1,000,000 tasks queued; ``dequeue_many``.
  The other task queues (RQ, BullMQ, Dramatiq) against luasched's: bench/queue_peers.py.
* ``durable``: the task cycle with a throwaway replica attached, plain and with
  ``wait_replicas=1`` (a ``WAIT`` after each state-changing call): the durable mode's cost.

A worker gets its own client from ``env.client()`` (its commands are counted for the
commandstats view); setup and teardown use ``env.control()``.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import luasched
from luasched.keys import REGISTRY_KEYS, Namespace
from luasched.lock import acquire_call, new_request_id, new_token, release_call
from luasched.queue import QueueKeys, enqueue_call

from .engine import Case, Env, Worker, add

# --------------------------------------------------------------------------------- helpers


def command_worker(env: Env, *command: Any) -> Worker:
    """A worker that sends one fixed command per call (pipelined: n of them per round trip)."""
    client = env.client()
    execute: Any = client.execute_command  # redis-py leaves it untyped

    def batch(size: int) -> None:
        pipe: Any = client.pipeline(transaction=False)
        for _ in range(size):
            pipe.execute_command(*command)
        pipe.execute()

    return Worker(call=lambda: execute(*command), batch=batch, close=client.close)


def sample_keys(count: int = 1024) -> Iterator[str]:
    """Endless keys spread over many slots (``user:0`` .. ``user:1023`` over and over)."""
    return itertools.cycle([f"user:{number}" for number in range(count)])


def scheduler_worker(
    env: Env,
    namespace: str,
    one: Callable[[Any, Iterator[str]], object],
) -> Worker:
    """A worker that makes one luasched call per ``call()``: ``one(api, keys)`` where ``api`` is
    a ``Scheduler`` (single calls) or a ``SchedulerPipeline`` (``batch``)."""
    scheduler = luasched.Scheduler(env.client(), namespace)
    scheduler.load_scripts()
    keys = sample_keys()

    def batch(size: int) -> None:
        with scheduler.pipeline() as pipe:
            for _ in range(size):
                one(pipe, keys)
            pipe.execute()

    return Worker(call=lambda: one(scheduler, keys), batch=batch, close=scheduler.client.close)


# ---------------------------------------------------------------------------------- floors

#: The floor of any atomic lease-based queue: take the first ready task, record its lease
#: deadline (server clock) and its holder. Not part of luasched: the reference its queue
#: scripts are compared with. KEYS: ready (zset), leased (zset: task -> deadline ms),
#: holders (hash: task -> worker). ARGV: lease_ms, worker. Reply: the task, or nil if none.
LEASE_SCRIPT = """\
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local popped = redis.call('ZPOPMIN', KEYS[1])
if popped[1] == nil then return false end
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[1]), popped[1])
redis.call('HSET', KEYS[3], popped[1], ARGV[2])
return popped[1]
"""

#: Empties the three lease keys and queues ARGV[1] tasks (score = position), in chunks.
LEASE_FILL_SCRIPT = """\
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
local total = tonumber(ARGV[1])
local chunk = {}
for number = 1, total do
  chunk[#chunk + 1] = number
  chunk[#chunk + 1] = 'task:' .. number
  if #chunk >= 2000 then
    redis.call('ZADD', KEYS[1], unpack(chunk))
    chunk = {}
  end
end
if #chunk > 0 then redis.call('ZADD', KEYS[1], unpack(chunk)) end
return total
"""

LEASE_KEYS = ("bench:{lease}:ready", "bench:{lease}:leased", "bench:{lease}:holders")


def _sha(env: Env, script: str) -> str:
    control = env.control()
    try:
        sha = control.script_load(script)
        return sha.decode() if isinstance(sha, bytes) else str(sha)
    finally:
        control.close()


def _lease_fill(env: Env, state: Any) -> None:
    # Enough tasks for a whole round of every client, warm-up included: no call finds it empty.
    settings = env.settings
    total = settings.max_calls + (settings.clients + 2) * (settings.warmup_calls + settings.batch)
    control = env.control()
    try:
        control.eval(LEASE_FILL_SCRIPT, len(LEASE_KEYS), *LEASE_KEYS, total)
    finally:
        control.close()


def _delete(env: Env, *keys: str | bytes) -> None:
    control = env.control()
    try:
        control.delete(*keys)
    finally:
        control.close()


add(
    Case(
        name="PING",
        group="floor",
        worker=lambda env, state, index: command_worker(env, "PING"),
        note="the round trip alone",
    )
)
add(
    Case(
        name="EVALSHA return 1",
        group="floor",
        setup=lambda env: _sha(env, "return 1"),
        worker=lambda env, sha, index: command_worker(env, "EVALSHA", sha, 0),
        note="the floor of any script: every ratio in this report refers to this row",
    )
)
add(
    Case(
        name="lease reference (TIME+ZPOPMIN+ZADD+HSET)",
        group="floor",
        setup=lambda env: _sha(env, LEASE_SCRIPT),
        before_round=_lease_fill,
        teardown=lambda env, state: _delete(env, *LEASE_KEYS),
        worker=lambda env, sha, index: command_worker(
            env, "EVALSHA", sha, len(LEASE_KEYS), *LEASE_KEYS, 30_000, f"worker-{index}"
        ),
        note="the minimal atomic dequeue-with-lease of any queue (bench/cases.py LEASE_SCRIPT)",
    )
)

# ----------------------------------------------------------------------------------- slots


def _keyslot_one(api: Any, keys: Iterator[str]) -> object:
    return api.slots.keyslot(next(keys))


def _keyslot_hundred(api: Any, keys: Iterator[str]) -> object:
    return api.slots.keyslots([next(keys) for _ in range(100)])


add(
    Case(
        name="slots.keyslot, 1 key",
        group="slots",
        worker=lambda env, state, index: scheduler_worker(env, "bench", _keyslot_one),
        note="CRC-16 of a short key in Lua",
    )
)
add(
    Case(
        name="slots.keyslot, 100 keys per call",
        group="slots",
        worker=lambda env, state, index: scheduler_worker(env, "bench", _keyslot_hundred),
        ops_per_call=100,
        unit="key",
        note="per key: one call hashes 100 keys",
    )
)

# ----------------------------------------------------------------------------------- nodes


def _has_registry() -> bool:
    """Whether this luasched has the node registry and slot table (issue 3)."""
    try:
        from luasched.nodes import Nodes
        from luasched.slots import Slots
    except ImportError:
        return False
    return hasattr(Nodes, "register") and all(
        hasattr(Slots, name) for name in ("owner", "rebalance")
    )


HAS_REGISTRY = _has_registry()


def register_nodes(
    env: Env,
    namespace: str,
    count: int,
    weight: Callable[[int], int],
    capacity: int | None = None,
) -> None:
    """Register ``count`` nodes (no deadline) in batches, after dropping the registry."""
    control = env.control()
    try:
        control.delete(*Namespace(namespace).registry_keys)
        scheduler = luasched.Scheduler(control, namespace)
        for start in range(0, count, 1000):
            with scheduler.pipeline() as pipe:
                for number in range(start, min(count, start + 1000)):
                    pipe.nodes.register(f"node-{number}", weight=weight(number), capacity=capacity)
                pipe.execute()
    finally:
        control.close()


def _owner_setup(count: int) -> Callable[[Env], str]:
    def setup(env: Env) -> str:
        namespace = f"bench-owner-{count}"
        register_nodes(env, namespace, count, lambda number: 1)
        control = env.control()
        try:
            luasched.Scheduler(control, namespace).slots.rebalance()
        finally:
            control.close()
        return namespace

    return setup


def _drop_namespace(env: Env, namespace: str) -> None:
    _delete(env, *Namespace(namespace).registry_keys)


def _owner(api: Any, keys: Iterator[str]) -> object:
    return api.slots.owner(next(keys))


def _rebalance(api: Any, keys: Iterator[str]) -> object:
    return api.slots.rebalance()


REBALANCE_NODES = 1000


def _rebalance_setup(env: Env) -> str:
    namespace = "bench-rebalance"
    register_nodes(env, namespace, REBALANCE_NODES, lambda number: 1 + number % 10)
    return namespace


def _slot_table_key(namespace: str) -> bytes:
    return Namespace(namespace).registry_keys[REGISTRY_KEYS.index("slots:owner")]


def _forget_slots(env: Env, namespace: str) -> None:
    """Drop the slot table: the next rebalance assigns all 16384 slots (its worst case)."""
    _delete(env, _slot_table_key(namespace))


def _rebalanced_setup(env: Env) -> str:
    """1,000 nodes, already rebalanced: the next rebalance moves nothing."""
    namespace = _rebalance_setup(env)
    control = env.control()
    try:
        luasched.Scheduler(control, namespace).slots.rebalance()
    finally:
        control.close()
    return namespace


if HAS_REGISTRY:
    for node_count in (10, 10_000):
        add(
            Case(
                name=f"slots.owner, {node_count:,} nodes",
                group="nodes",
                setup=_owner_setup(node_count),
                teardown=_drop_namespace,
                worker=lambda env, namespace, index: scheduler_worker(env, namespace, _owner),
                note="after rebalance; keys user:0..1023 spread over the slots",
            )
        )
    add(
        Case(
            name=f"slots.rebalance, {REBALANCE_NODES:,} nodes, all 16384 slots move",
            group="nodes",
            setup=_rebalance_setup,
            teardown=_drop_namespace,
            before_round=_forget_slots,
            worker=lambda env, namespace, index: scheduler_worker(env, namespace, _rebalance),
            modes=("single",),
            max_calls=1,
            rounds=7,
            note="one call per round, from an empty slot table (weights 1..10): the worst case",
        )
    )
    add(
        Case(
            name=f"slots.rebalance, {REBALANCE_NODES:,} nodes, nothing moves",
            group="nodes",
            setup=_rebalanced_setup,
            teardown=_drop_namespace,
            worker=lambda env, namespace, index: scheduler_worker(env, namespace, _rebalance),
            modes=("single",),
            max_calls=200,
            note="a second rebalance with no change: the pass over the table alone",
        )
    )


# ----------------------------------------------------------------------------------- locks
# One lock name per client: these rows measure an uncontended acquire + release cycle.

LOCK_TTL_S = 30


def _lock_cycle(acquire: Callable[[], object], release: Callable[[], object]) -> Callable[[], None]:
    def cycle() -> None:
        if not acquire():
            raise RuntimeError("an uncontended lock was not acquired")
        release()

    return cycle


def redis_py_lock_worker(env: Env, state: Any, index: int) -> Worker:
    client = env.client()
    lock = client.lock(f"bench:lock:redis-py:{index}", timeout=LOCK_TTL_S)
    return Worker(
        call=_lock_cycle(lambda: lock.acquire(blocking=False), lock.release), close=client.close
    )


def python_redis_lock_worker(env: Env, state: Any, index: int) -> Worker:
    import redis_lock  # python-redis-lock

    client = env.client()
    lock = redis_lock.Lock(client, f"bench:python-redis-lock:{index}", expire=LOCK_TTL_S)
    return Worker(
        call=_lock_cycle(lambda: lock.acquire(blocking=False), lock.release), close=client.close
    )


def pottery_worker(env: Env, state: Any, index: int) -> Worker:
    from pottery import Redlock

    client = env.client()
    lock = Redlock(key=f"bench:pottery:{index}", masters={client}, auto_release_time=LOCK_TTL_S)
    return Worker(
        call=_lock_cycle(lambda: lock.acquire(blocking=False), lock.release), close=client.close
    )


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


LOCK_PEERS: list[tuple[str, str, Callable[[Env, Any, int], Worker], str]] = [
    ("redis-py Lock", "redis", redis_py_lock_worker, "SET NX PX; release: EVALSHA (GET+DEL)"),
    (
        "python-redis-lock",
        "redis_lock",
        python_redis_lock_worker,
        "GET + SET NX EX; release: EVALSHA (GET, DEL, LPUSH+PEXPIRE signal)",
    ),
    (
        "pottery Redlock (1 master)",
        "pottery",
        pottery_worker,
        "SET NX PX; release: EVALSHA; a thread pool per call",
    ),
]

for peer_name, peer_module, peer_worker, peer_note in LOCK_PEERS:
    if _installed(peer_module):
        add(
            Case(
                name=f"{peer_name} acquire+release",
                group="locks",
                worker=peer_worker,
                modes=("single", "multi"),
                unit="cycle",
                note=peer_note,
            )
        )

LOCK_NAMESPACE = "bench-lock"


def luasched_lock_worker(fair: bool) -> Callable[[Env, Any, int], Worker]:
    """``s.lock(name).acquire(blocking=False)`` + ``handle.release()``, as a user writes it:
    a fresh owner token per acquire, which is the calls' idempotency key (the wrapper's default
    for a non-reentrant lock: no request id, the scripts' lean path)."""

    def make(env: Env, state: Any, index: int) -> Worker:
        scheduler = luasched.Scheduler(env.client(), LOCK_NAMESPACE)
        scheduler.load_scripts()
        lock = scheduler.lock(
            f"uncontended-{int(fair)}-{index}", ttl_ms=LOCK_TTL_S * 1000, fair=fair
        )

        def cycle() -> None:
            handle = lock.acquire(blocking=False)
            if handle is None:
                raise RuntimeError("an uncontended lock was not acquired")
            handle.release()

        return Worker(call=cycle, close=scheduler.client.close)

    return make


def luasched_lock_request_id_worker(env: Env, state: Any, index: int) -> Worker:
    """The same two scripts through the call builders with a fresh request id per call (what a
    reentrant lock sends): the general path, a request record written per call."""
    scheduler = luasched.Scheduler(env.client(), LOCK_NAMESPACE)
    scheduler.load_scripts()
    runner, namespace, name = scheduler.runner, scheduler.namespace, f"request-id-{index}"
    ttl_ms = LOCK_TTL_S * 1000

    def cycle() -> None:
        token = new_token()
        call = acquire_call(namespace, name, token, ttl_ms, request_id=new_request_id())
        if not runner.run(call).acquired:
            raise RuntimeError("an uncontended lock was not acquired")
        runner.run(release_call(namespace, name, token, new_request_id()))

    return Worker(call=cycle, close=scheduler.client.close)


def _drop_pattern(env: Env, pattern: str | bytes) -> None:
    """Delete every key matching ``pattern`` (SCAN + UNLINK)."""
    control = env.control()
    try:
        keys = list(control.scan_iter(match=pattern, count=10_000))
        for start in range(0, len(keys), 10_000):
            control.unlink(*keys[start : start + 10_000])
    finally:
        control.close()


def _drop_prefix(env: Env, namespace: str) -> None:
    """Delete every key of ``namespace`` (SCAN + UNLINK)."""
    _drop_pattern(env, Namespace(namespace).prefix + b"*")


LUASCHED_LOCKS: list[tuple[str, Callable[[Env, Any, int], Worker], str]] = [
    (
        "luasched lock acquire+release",
        luasched_lock_worker(fair=False),
        "EVALSHA lock.acquire + EVALSHA lock.release; fencing token; the single-use owner token "
        "is the idempotency key (default: the lean path, TIME+GET+SET each)",
    ),
    (
        "luasched lock acquire+release, request ids",
        luasched_lock_request_id_worker,
        "the same scripts with a request id per call (call builders; what reentrant locks "
        "send): the general path and a request record",
    ),
    (
        "luasched fair lock acquire+release",
        luasched_lock_worker(fair=True),
        "fair=True, uncontended (the queue stays empty); no request id (default)",
    ),
]

for lock_name, lock_worker, lock_note in LUASCHED_LOCKS:
    add(
        Case(
            name=lock_name,
            group="locks",
            worker=lock_worker,
            teardown=lambda env, state: _drop_prefix(env, LOCK_NAMESPACE),
            modes=("single", "multi"),
            unit="cycle",
            note=lock_note,
        )
    )

# ------------------------------------------------------------------------------------ pick
# Nodes registered with the largest capacity (10^12) and no deadline: a charging pick never
# finds them full, so nothing is released between picks.

PICK_CAPACITY = 10**12
PICK_NODE_COUNTS = (10, 10_000)
PICKS: list[tuple[str, str]] = [
    ("least_loaded", "charges the least utilized node 1 (ties at random)"),
    ("two_choices", "the less utilized of two random nodes, charged 1"),
    ("weighted", "random by weight (weights 1..10); its table is built during the warm-up"),
    ("least_recent", "the node picked longest ago, stamped now"),
]


def pick_row(strategy: str, count: int) -> str:
    return f"pick.{strategy}, {count:,} nodes"


def _pick_setup(count: int) -> Callable[[Env], str]:
    def setup(env: Env) -> str:
        namespace = f"bench-pick-{count}"
        register_nodes(env, namespace, count, lambda number: 1 + number % 10, PICK_CAPACITY)
        return namespace

    return setup


def _pick_worker(strategy: str) -> Callable[[Env, Any, int], Worker]:
    def one(api: Any, keys: Iterator[str]) -> object:
        return getattr(api.pick, strategy)()

    return lambda env, namespace, index: scheduler_worker(env, namespace, one)


if HAS_REGISTRY:
    for pick_strategy, pick_note in PICKS:
        for pick_count in PICK_NODE_COUNTS:
            add(
                Case(
                    name=pick_row(pick_strategy, pick_count),
                    group="pick",
                    setup=_pick_setup(pick_count),
                    teardown=lambda env, namespace: _drop_prefix(env, namespace),
                    worker=_pick_worker(pick_strategy),
                    note=pick_note,
                    reference=None
                    if pick_count == PICK_NODE_COUNTS[0]
                    else pick_row(pick_strategy, PICK_NODE_COUNTS[0]),
                )
            )

# ----------------------------------------------------------------------------------- queue

PAYLOAD = b"p" * 32
QUEUE_LEASE_MS = 600_000  # nothing expires during the run: a dequeue never reclaims
QUEUE_WORKER = b"bench-worker"

#: The bare reference queue: the least any atomic lease-based queue does, in three scripts.
#: KEYS: ready (zset), leased (zset: task -> deadline ms), tasks (hash: id -> payload and
#: "o:" id -> holder). No idempotency, priorities, delays, attempts, fencing or dead letters.
REFERENCE_ENQUEUE = """\
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
REFERENCE_DEQUEUE = """\
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local popped = redis.call('ZPOPMIN', KEYS[1])
if popped[1] == nil then return false end
local id = popped[1]
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[1]), id)
redis.call('HSET', KEYS[3], 'o:' .. id, ARGV[2])
return {id, redis.call('HGET', KEYS[3], id)}
"""
REFERENCE_ACK = """\
if redis.call('HGET', KEYS[3], 'o:' .. ARGV[1]) ~= ARGV[2] then
  return redis.error_reply('NOT_OWNER')
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1], 'o:' .. ARGV[1])
return 1
"""
REFERENCE_QUEUE_ROW = "bare reference queue enqueue+dequeue+ack"

#: The featured floor: the least a queue with today's guarantees (docs/guarantees.md) must do on top
#: of the bare reference, with no argument checks, no stats fields, no wake-ups, no dead letters and
#: no delayed path (the enqueue puts a task in ready); max_attempts is one per queue (dead letters
#: after that many leases need no per-task value), so "m" holds the priority only. Every call keeps
#: a request record (GET first, SET PX last) so a replay acts once; enqueue is idempotent by task id
#: (the HMGET that reads seq also finds the id) and orders FIFO within a priority (seq); dequeue
#: reads the server's clock, checks for due delayed tasks and expired leases (ZCOUNT each: it would
#: have to promote and reclaim them), counts the attempt and hands out a fencing token by
#: lua/include/fence.j2's rule, max(last + 1, server µs), the rest of a batch one by one after it
#: (one HMGET reads fence, attempts and payloads; one HSET writes them back); its record names the
#: leases (ids and tokens), so a replay can answer them; ack checks the lease's token. The first
#: enqueue writes a field longer than hash-max-listpack-value, as luasched's does, so the tasks hash
#: is a hashtable at every depth (a listpack is scanned by every HGET and HSET). KEYS: ready,
#: delayed, leased, tasks (hash: "p" payload, "m" priority, "a" attempts, "o" token of the lease,
#: "seq", "fence"), request. ARGV: enqueue: task id, payload, priority, record ttl; dequeue: count,
#: lease ms, record ttl, then optionally the task id and token of a lease to ack first
#: (ack-and-take-next); ack: task id, token, record ttl. A dequeue answers 5 entries per task: id,
#: payload, attempt, token, deadline.
FEATURED_ENQUEUE = """\
local LAYOUT = 'a value over 64 bytes: this tasks hash stays a hashtable at every depth'
if redis.call('GET', KEYS[5]) then return 0 end
local found = redis.call('HMGET', KEYS[4], 'm' .. ARGV[1], 'seq')
if found[1] then return 0 end
local seq = (found[2] or 0) + 1
redis.call('ZADD', KEYS[1], (511 - ARGV[3]) * 8796093022208 + seq, ARGV[1])
redis.call('HSET', KEYS[4], 'p' .. ARGV[1], ARGV[2], 'm' .. ARGV[1], ARGV[3], 'seq', seq)
if seq == 1 then redis.call('HSET', KEYS[4], 'layout', LAYOUT) end
redis.call('SET', KEYS[5], '1', 'PX', ARGV[4])
return 1
"""
FEATURED_DEQUEUE = """\
if redis.call('GET', KEYS[5]) then return 0 end
local ack = ARGV[4]
if ack and redis.call('HGET', KEYS[4], 'o' .. ack) ~= ARGV[5] then
  return redis.error_reply('STALE')
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local now_us = now[1] * 1000000 + now[2]
if redis.call('ZCOUNT', KEYS[2], '-inf', now_ms) ~= 0 then return 0 end
if redis.call('ZCOUNT', KEYS[3], '-inf', now_ms) ~= 0 then return 0 end
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
local taken = #popped / 2
if taken == 0 then return false end
local fields = {'fence'}
for i = 1, taken do
  local id = popped[2 * i - 1]
  fields[2 * i] = 'a' .. id
  fields[2 * i + 1] = 'p' .. id
end
local values = redis.call('HMGET', KEYS[4], unpack(fields))
local last = (values[1] or 0) + 0
local token = last < now_us and now_us or last + 1
local deadline_ms = now_ms + ARGV[2]
local leased, writes, reply, record = {}, {}, {}, {}
for i = 1, taken do
  local id = popped[2 * i - 1]
  local attempt = (values[2 * i] or 0) + 1
  leased[2 * i - 1] = deadline_ms
  leased[2 * i] = id
  writes[4 * i - 3] = fields[2 * i]
  writes[4 * i - 2] = attempt
  writes[4 * i - 1] = 'o' .. id
  writes[4 * i] = token
  reply[5 * i - 4] = id
  reply[5 * i - 3] = values[2 * i + 1]
  reply[5 * i - 2] = attempt
  reply[5 * i - 1] = token
  reply[5 * i] = deadline_ms
  record[2 * i - 1] = id
  record[2 * i] = token
  token = token + 1
end
writes[4 * taken + 1] = 'fence'
writes[4 * taken + 2] = token - 1
if ack then
  redis.call('ZREM', KEYS[3], ack)
  redis.call('HDEL', KEYS[4], 'p' .. ack, 'm' .. ack, 'a' .. ack, 'o' .. ack)
end
redis.call('ZADD', KEYS[3], unpack(leased))
redis.call('HSET', KEYS[4], unpack(writes))
redis.call('SET', KEYS[5], cmsgpack.pack(record), 'PX', ARGV[3])
return reply
"""
FEATURED_ACK = """\
if redis.call('GET', KEYS[5]) then return 0 end
if redis.call('HGET', KEYS[4], 'o' .. ARGV[1]) ~= ARGV[2] then
  return redis.error_reply('STALE')
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], 'p' .. ARGV[1], 'm' .. ARGV[1], 'a' .. ARGV[1], 'o' .. ARGV[1])
redis.call('SET', KEYS[5], '1', 'PX', ARGV[3])
return 1
"""

#: The featured floor's acks of a batch in one call (not a luasched script: what a batched ack
#: would cost at the least): one HMGET of the leases' tokens, ZREM and HDEL of the held ones, one
#: request record for the call. ARGV: record ttl, then task id and token of each lease. Answers
#: 1 (acked) or 0 (not held) per lease.
FEATURED_ACK_MANY = """\
if redis.call('GET', KEYS[5]) then return 0 end
local count = (#ARGV - 1) / 2
local fields = {}
for i = 1, count do fields[i] = 'o' .. ARGV[2 * i] end
local tokens = redis.call('HMGET', KEYS[4], unpack(fields))
local held, removed, reply = {}, {}, {}
for i = 1, count do
  local id = ARGV[2 * i]
  reply[i] = 0
  if tokens[i] == ARGV[2 * i + 1] then
    reply[i] = 1
    held[#held + 1] = id
    removed[#removed + 1] = 'p' .. id
    removed[#removed + 1] = 'm' .. id
    removed[#removed + 1] = 'a' .. id
    removed[#removed + 1] = fields[i]
  end
end
if #held > 0 then
  redis.call('ZREM', KEYS[3], unpack(held))
  redis.call('HDEL', KEYS[4], unpack(removed))
end
redis.call('SET', KEYS[5], cmsgpack.pack(reply), 'PX', ARGV[1])
return reply
"""

#: A Dramatiq-shaped queue (a list of ids, a hash of messages, a set of unacked ids: the shape
#: of Dramatiq's RedisBroker, without its heartbeats) plus only a request record per call (GET
#: first, SET PX last): no priorities, no leases with deadlines, no attempts, no fencing tokens.
#: Against Dramatiq it shows what the request records cost; against the featured floor, what
#: the rest of the guarantees cost. KEYS: queue (list), messages (hash), unacked (set), request.
#: ARGV: enqueue: id, payload, record ttl; fetch: count, record ttl; ack: id, record ttl.
SHAPED_ENQUEUE = """\
if redis.call('GET', KEYS[4]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
return 1
"""
SHAPED_FETCH = """\
if redis.call('GET', KEYS[4]) then return 0 end
local ids = redis.call('LPOP', KEYS[1], ARGV[1])
if not ids then return false end
local payloads = redis.call('HMGET', KEYS[2], unpack(ids))
redis.call('SADD', KEYS[3], unpack(ids))
redis.call('SET', KEYS[4], cmsgpack.pack(ids), 'PX', ARGV[2])
local reply = {}
for i = 1, #ids do
  reply[2 * i - 1] = ids[i]
  reply[2 * i] = payloads[i]
end
return reply
"""
SHAPED_ACK = """\
if redis.call('GET', KEYS[4]) then return 0 end
if redis.call('SREM', KEYS[3], ARGV[1]) == 0 then return redis.error_reply('STALE') end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
return 1
"""
FEATURED_QUEUE_ROW = "featured floor queue enqueue+dequeue+ack"
FEATURED_REQUEST_TTL_MS = 60_000
LUASCHED_CYCLE_ROW = "queue enqueue+dequeue+ack"


def _task_ids() -> Iterator[bytes]:
    """Task ids unique across processes and rows: ``<pid>-<n>``."""
    prefix = f"{os.getpid()}-".encode()
    return (prefix + str(number).encode() for number in itertools.count())


def reference_queue_worker(env: Env, shas: tuple[str, str, str], index: int) -> Worker:
    client = env.client()
    keys = tuple(f"bench:{{refq-{index}}}:{kind}" for kind in ("ready", "leased", "tasks"))
    enqueue_sha, dequeue_sha, ack_sha = shas
    ids = _task_ids()
    scores = itertools.count()
    execute: Any = client.execute_command

    def call() -> None:
        execute("EVALSHA", enqueue_sha, 3, *keys, next(ids), PAYLOAD, next(scores))
        taken = execute("EVALSHA", dequeue_sha, 3, *keys, QUEUE_LEASE_MS, QUEUE_WORKER)
        if not taken:
            raise RuntimeError("the reference queue was empty")
        execute("EVALSHA", ack_sha, 3, *keys, taken[0], QUEUE_WORKER)

    def batch(size: int) -> None:
        pipe: Any = client.pipeline(transaction=False)
        for _ in range(size):
            pipe.execute_command("EVALSHA", enqueue_sha, 3, *keys, next(ids), PAYLOAD, next(scores))
        for _ in range(size):
            pipe.execute_command("EVALSHA", dequeue_sha, 3, *keys, QUEUE_LEASE_MS, QUEUE_WORKER)
        taken = pipe.execute()[size:]
        pipe = client.pipeline(transaction=False)
        for task in taken:
            pipe.execute_command("EVALSHA", ack_sha, 3, *keys, task[0], QUEUE_WORKER)
        pipe.execute()

    return Worker(call=call, batch=batch, close=client.close)


def _reference_setup(env: Env) -> tuple[str, str, str]:
    return (
        _sha(env, REFERENCE_ENQUEUE),
        _sha(env, REFERENCE_DEQUEUE),
        _sha(env, REFERENCE_ACK),
    )


def _reference_teardown(env: Env, state: Any) -> None:
    _drop_pattern(env, "bench:{refq-*")


def featured_queue_worker(env: Env, shas: tuple[str, str, str], index: int) -> Worker:
    client = env.client()
    prefix = f"bench:{{featq-{index}}}:"
    keys = tuple(prefix + kind for kind in ("ready", "delayed", "leased", "tasks"))
    enqueue_sha, dequeue_sha, ack_sha = shas
    ids = _task_ids()
    ttl = FEATURED_REQUEST_TTL_MS
    execute: Any = client.execute_command

    def request() -> str:  # a fresh request key per call, as the wrapper's request ids
        return prefix + "req:" + new_request_id().decode()

    def call() -> None:
        execute("EVALSHA", enqueue_sha, 5, *keys, request(), next(ids), PAYLOAD, 0, ttl)
        taken = execute("EVALSHA", dequeue_sha, 5, *keys, request(), 1, QUEUE_LEASE_MS, ttl)
        if not taken:
            raise RuntimeError("the featured floor queue was empty")
        execute("EVALSHA", ack_sha, 5, *keys, request(), taken[0], taken[3], ttl)

    def batch(size: int) -> None:
        pipe: Any = client.pipeline(transaction=False)
        for _ in range(size):
            pipe.execute_command(
                "EVALSHA", enqueue_sha, 5, *keys, request(), next(ids), PAYLOAD, 0, ttl
            )
        for _ in range(size):
            pipe.execute_command(
                "EVALSHA", dequeue_sha, 5, *keys, request(), 1, QUEUE_LEASE_MS, ttl
            )
        taken = pipe.execute()[size:]
        pipe = client.pipeline(transaction=False)
        for task in taken:
            pipe.execute_command("EVALSHA", ack_sha, 5, *keys, request(), task[0], task[3], ttl)
        pipe.execute()

    return Worker(call=call, batch=batch, close=client.close)


def _featured_setup(env: Env) -> tuple[str, str, str]:
    return (_sha(env, FEATURED_ENQUEUE), _sha(env, FEATURED_DEQUEUE), _sha(env, FEATURED_ACK))


QUEUE_NAMESPACE = "bench-queue"


def luasched_cycle_worker(env: Env, state: Any, index: int, **options: Any) -> Worker:
    """enqueue + dequeue + ack through the wrapper (request ids: its default); ``options``
    go to the Scheduler (``wait_replicas``...)."""
    scheduler = luasched.Scheduler(env.client(), QUEUE_NAMESPACE, **options)
    scheduler.load_scripts()
    name = f"cycle-{index}"
    queue = scheduler.queue(name)
    ids = _task_ids()

    def call() -> None:
        queue.enqueue(next(ids), PAYLOAD)
        lease = queue.dequeue(QUEUE_WORKER, QUEUE_LEASE_MS)
        if lease is None:
            raise RuntimeError("the queue was empty")
        queue.ack(lease)

    def batch(size: int) -> None:
        with scheduler.pipeline() as pipe:
            queued = pipe.queue(name)
            for _ in range(size):
                queued.enqueue(next(ids), PAYLOAD)
            for _ in range(size):
                queued.dequeue(QUEUE_WORKER, QUEUE_LEASE_MS)
            leases = pipe.execute()[size:]
        with scheduler.pipeline() as pipe:
            queued = pipe.queue(name)
            for lease in leases:
                queued.ack(lease)
            pipe.execute()

    return Worker(call=call, batch=batch, close=scheduler.client.close)


def luasched_ack_and_dequeue_worker(env: Env, state: Any, index: int) -> Worker:
    """enqueue + ack_and_dequeue (acks the previous lease, takes this one): 2 calls a task."""
    scheduler = luasched.Scheduler(env.client(), QUEUE_NAMESPACE)
    scheduler.load_scripts()
    queue = scheduler.queue(f"ack-and-dequeue-{index}")
    ids = _task_ids()
    held: list[Any] = []

    def call() -> None:
        queue.enqueue(next(ids), PAYLOAD)
        if held:
            lease = queue.ack_and_dequeue(held.pop(), QUEUE_WORKER, QUEUE_LEASE_MS)
        else:
            lease = queue.dequeue(QUEUE_WORKER, QUEUE_LEASE_MS)
        if lease is None:
            raise RuntimeError("the queue was empty")
        held.append(lease)

    def close() -> None:
        if held:
            queue.ack(held.pop())
        scheduler.client.close()

    return Worker(call=call, close=close)


add(
    Case(
        name=REFERENCE_QUEUE_ROW,
        group="queue",
        setup=_reference_setup,
        teardown=_reference_teardown,
        worker=reference_queue_worker,
        unit="task",
        note="bench/cases.py REFERENCE_*: HSET+ZADD / TIME+ZPOPMIN+ZADD+HSET+HGET / "
        "owner check+ZREM+HDEL; pipelined: the enqueues and dequeues in one round trip, the "
        "acks in a second",
    )
)
add(
    Case(
        name=FEATURED_QUEUE_ROW,
        group="queue",
        setup=_featured_setup,
        teardown=lambda env, state: _drop_pattern(env, "bench:{featq-*"),
        worker=featured_queue_worker,
        unit="task",
        reference=REFERENCE_QUEUE_ROW,
        note="bench/cases.py FEATURED_*: the reference plus what the guarantees ask of every call "
        "(request record GET + SET PX, dedupe and seq in one HMGET, TIME, due/expired checks, "
        "attempt and clock-derived fence in one HMGET + HSET, token check), no argument checks; "
        "pipelined as the reference",
    )
)
add(
    Case(
        name=LUASCHED_CYCLE_ROW,
        group="queue",
        teardown=lambda env, state: _drop_prefix(env, QUEUE_NAMESPACE),
        worker=luasched_cycle_worker,
        unit="task",
        reference=REFERENCE_QUEUE_ROW,
        note="q.enqueue + q.dequeue + q.ack, request ids (the default); pipelined as the reference",
    )
)
add(
    Case(
        name="queue enqueue+ack_and_dequeue",
        group="queue",
        teardown=lambda env, state: _drop_prefix(env, QUEUE_NAMESPACE),
        worker=luasched_ack_and_dequeue_worker,
        unit="task",
        modes=("single", "multi"),
        reference=REFERENCE_QUEUE_ROW,
        note="q.enqueue + q.ack_and_dequeue (the previous lease's ack rides on the next "
        "dequeue): 2 calls per task",
    )
)

# Dequeue with a deep queue. Each round may take at most DEQUEUE_ROUND_CALLS calls (all
# clients), and before it the queue is topped up to depth + what a round and its warm-ups can
# take: the depth during a round stays between ``depth`` and that. Dequeued tasks stay leased
# (no ack): the leased set grows the same way in every such row.

DEQUEUE_ROUND_CALLS = 3_000
DEQUEUE_MANY_N = 100
DEQUEUE_MANY_ROUND_CALLS = 50
DEQUEUE_QUEUE = "deep"


@dataclass
class DeepQueue:
    namespace: str
    depth: int
    top_up: int  # tasks added above depth before each round
    enqueue_sha: str
    ids: Iterator[bytes]


def _fill(env: Env, state: DeepQueue, target: int) -> None:
    """Enqueue (``fill_queue``: the real queue.enqueue, no request id) up to ``target`` ready."""
    control = env.control()
    try:
        scheduler = luasched.Scheduler(control, state.namespace)
        ready = scheduler.queue(DEQUEUE_QUEUE).stats().ready
    finally:
        control.close()
    if target > ready:
        keys = QueueKeys.of(Namespace(state.namespace), DEQUEUE_QUEUE)
        fill_queue(env.host, env.port, state.enqueue_sha, keys, target - ready, state.ids)


def fill_queue(
    host: str, port: int, sha: str, keys: QueueKeys, count: int, ids: Iterator[bytes]
) -> int:
    """Enqueue ``count`` ready tasks through the real ``queue.enqueue`` script (no request id),
    ids from ``ids`` (new ones: an existing id fails the fill), in large raw pipelines over one
    socket: the client packs RESP itself and checks every reply byte for byte, so the fill runs
    at the server's pace (10,000 commands in flight). Returns the tasks added."""
    call = enqueue_call(keys, b"x", PAYLOAD, request_id=b"")
    head = [b"EVALSHA", sha.encode(), str(len(call.keys)).encode(), *call.keys]
    tail = [_arg(value) for value in call.args[1:]]
    prefix = f"*{len(head) + 1 + len(tail)}\r\n".encode() + b"".join(_bulk(part) for part in head)
    suffix = b"".join(_bulk(part) for part in tail)
    expected = b"*2\r\n:1\r\n$5\r\nready\r\n"
    chunk_size = 10_000
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = 0
        done = 0
        while done < count:
            size = min(chunk_size, count - done - pending)
            if size > 0:
                sock.sendall(b"".join(prefix + _bulk(next(ids)) + suffix for _ in range(size)))
            if pending:
                _expect(sock, expected * pending)
                done += pending
            pending = max(size, 0)
    return done


def _arg(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _bulk(value: bytes) -> bytes:
    return b"$" + str(len(value)).encode() + b"\r\n" + value + b"\r\n"


def _expect(sock: socket.socket, expected: bytes) -> None:
    """Read exactly ``len(expected)`` bytes (replies of later commands stay in the socket);
    raise unless they are ``expected``."""
    view = memoryview(bytearray(len(expected)))
    got = 0
    while got < len(expected):
        size = sock.recv_into(view[got:])
        if not size:
            raise RuntimeError("the server closed the fill connection")
        if view[got : got + size] != expected[got : got + size]:
            start = max(0, got - 100)
            raise RuntimeError(f"queue.enqueue refused a fill task: {bytes(view[start:])!r}")
        got += size


def _deep_setup(depth: int, ops_per_call: int, round_calls: int) -> Callable[[Env], DeepQueue]:
    def setup(env: Env) -> DeepQueue:
        settings = env.settings
        namespace = f"bench-deep-{depth}-{ops_per_call}"
        _drop_prefix(env, namespace)
        control = env.control()
        try:
            shas = luasched.Scheduler(control, namespace).load_scripts()
        finally:
            control.close()
        warm = (settings.clients + 1) * settings.warmup_calls + settings.batch
        top_up = ops_per_call * (round_calls + warm)
        state = DeepQueue(namespace, depth, top_up, shas["queue.enqueue"], _task_ids())
        _fill(env, state, depth + top_up)
        return state

    return setup


def _deep_worker(count: int) -> Callable[[Env, DeepQueue, int], Worker]:
    def make(env: Env, state: DeepQueue, index: int) -> Worker:
        scheduler = luasched.Scheduler(env.client(), state.namespace)
        scheduler.load_scripts()
        queue = scheduler.queue(DEQUEUE_QUEUE)

        def call() -> None:
            if count == 1:
                taken = 1 if queue.dequeue(QUEUE_WORKER, QUEUE_LEASE_MS) is not None else 0
            else:
                taken = len(queue.dequeue_many(QUEUE_WORKER, count, QUEUE_LEASE_MS))
            if taken != count:
                raise RuntimeError(f"the queue ran dry: {taken} of {count} taken")

        def batch(size: int) -> None:
            with scheduler.pipeline() as pipe:
                queued = pipe.queue(DEQUEUE_QUEUE)
                for _ in range(size):
                    queued.dequeue(QUEUE_WORKER, QUEUE_LEASE_MS)
                if any(lease is None for lease in pipe.execute()):
                    raise RuntimeError("the queue ran dry")

        return Worker(call=call, batch=batch if count == 1 else None, close=scheduler.client.close)

    return make


def dequeue_row(depth: int) -> str:
    return f"queue.dequeue, {depth:,} queued"


DEQUEUE_DEPTHS: list[tuple[int, bool]] = [(1_000, False), (100_000, False), (1_000_000, True)]

for queue_depth, queue_full_only in DEQUEUE_DEPTHS:
    add(
        Case(
            name=dequeue_row(queue_depth),
            group="queue",
            setup=_deep_setup(queue_depth, 1, DEQUEUE_ROUND_CALLS),
            before_round=lambda env, state: _fill(env, state, state.depth + state.top_up),
            teardown=lambda env, state: _drop_prefix(env, state.namespace),
            worker=_deep_worker(1),
            unit="task",
            max_calls=DEQUEUE_ROUND_CALLS,
            full_only=queue_full_only,
            reference=(
                "lease reference (TIME+ZPOPMIN+ZADD+HSET)"
                if queue_depth == DEQUEUE_DEPTHS[0][0]
                else dequeue_row(DEQUEUE_DEPTHS[0][0])
            ),
            note=f"q.dequeue, no ack; each round takes at most {DEQUEUE_ROUND_CALLS:,} "
            "(refilled before it, pipelined enqueues)"
            + (
                "; full run only (its fill: 1,000,000 queue.enqueue calls)"
                if queue_full_only
                else ""
            ),
        )
    )

add(
    Case(
        name=f"queue.dequeue_many n={DEQUEUE_MANY_N}, 1,000 queued",
        group="queue",
        setup=_deep_setup(1_000, DEQUEUE_MANY_N, DEQUEUE_MANY_ROUND_CALLS),
        before_round=lambda env, state: _fill(env, state, state.depth + state.top_up),
        teardown=lambda env, state: _drop_prefix(env, state.namespace),
        worker=_deep_worker(DEQUEUE_MANY_N),
        ops_per_call=DEQUEUE_MANY_N,
        unit="task",
        modes=("single", "multi"),
        max_calls=DEQUEUE_MANY_ROUND_CALLS,
        reference=dequeue_row(1_000),
        note=f"per task: one call leases {DEQUEUE_MANY_N}; no ack",
    )
)


# --------------------------------------------------------------------------------- durable
# Durable mode (``wait_replicas``, docs/ha.md): the same task cycle with and without a WAIT after
# each state-changing call, on the benchmark server with a throwaway replica attached for both
# rows (so replication's own cost is in both); its ratio to the plain row is the mode's cost.

DURABLE_PLAIN_ROW = "durable: cycle, plain (1 replica attached)"
DURABLE_ROW = "durable: cycle, wait_replicas=1"


def _replica_setup(env: Env) -> Any:
    """A throwaway replica of the benchmark server (same binary), in sync before the row."""
    from luasched.testing import HOST, ThrowawayServer

    control = env.control()
    binary = control.info("server")["executable"]
    replica = ThrowawayServer(binary, ["--replicaof", HOST, str(env.port)])
    replica.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = control.info("replication")
        if int(info.get("connected_slaves", 0)) == 1 and info["slave0"]["state"] == "online":
            control.close()
            return replica
        time.sleep(0.05)
    replica.stop()
    control.close()
    raise RuntimeError("the benchmark's replica did not come online within 30 s")


def _replica_teardown(env: Env, replica: Any) -> None:
    replica.stop()
    _drop_prefix(env, QUEUE_NAMESPACE)


for _name, _options, _reference, _note in (
    (DURABLE_PLAIN_ROW, {}, None, "q.enqueue + q.dequeue + q.ack, a replica attached"),
    (
        DURABLE_ROW,
        {"wait_replicas": 1, "wait_timeout_ms": 1000},
        DURABLE_PLAIN_ROW,
        "the same, each call followed by WAIT 1 1000 in its round trip (pipelined: one WAIT per "
        "batch)",
    ),
):
    add(
        Case(
            name=_name,
            group="durable",
            setup=_replica_setup,
            teardown=_replica_teardown,
            worker=functools.partial(luasched_cycle_worker, **_options),
            unit="task",
            reference=_reference,
            note=_note,
        )
    )
